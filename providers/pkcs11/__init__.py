"""The pkcs11 provider: a region's keys in an HSM over PKCS#11 (python-pkcs11), SoftHSMv2 in
tests. It offers the KeyService and the Sealer only; a region takes its compute and vault
from another provider."""
