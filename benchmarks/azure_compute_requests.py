"""What AzureCompute asks of Azure per GiB: blob requests (through the snapshot's read SAS and
the restore disk's write SAS) and ARM requests for a capture of a VM's fully written OS disk
and for a restore into a new disk with its launch, counted against the ARM fake over Azurite
(both on 127.0.0.1, started and stopped here). Not a test: request counts; the MiB/s are
Azurite's, not Azure's.

    .venv/bin/python benchmarks/azure_compute_requests.py [--mib 256]

Azurite is started (and installed on first use) by the provider's launcher; needs the test extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "azure"))

from azure_compute_world import ArmWorld, azurite
from regionvault.core.types import CaptureKind, LaunchSpec, Tags
from regionvault.providers.azure.compute import AzureBlockCapture, AzureBlockSink, MiB
from regionvault.providers.azure.fakes.arm import ArmFake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    size = parser.parse_args().mib * MiB
    gib = size / (1024 * MiB)
    with tempfile.TemporaryDirectory() as tmp, azurite(Path(tmp)) as (server, account, key):
        url = server.account_url(account)
        fake = ArmFake(
            blob_endpoint=url, account=account, account_key=key, workdir=Path(tmp) / "arm"
        )
        with fake:
            world = ArmWorld(fake, url)
            compute = world.compute()
            image = os.urandom(size)
            vm = world.seed_vm("bench", tags={"backup": "1-7"}, image=image)
            arm = len(fake.requests)
            start = time.perf_counter()
            with compute.capture(vm) as capture:
                assert isinstance(capture, AzureBlockCapture)
                read = sum(len(d) for _o, d in capture.blocks())
            took = time.perf_counter() - start
            arm_capture = len(fake.requests) - arm
            blob_capture = capture.reads + 1  # and one Get Page Ranges
            spec = LaunchSpec(
                name="bench-restored", tags=Tags({"backup": "1-7"}), function="Standard_B2s"
            )
            arm = len(fake.requests)
            sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=size)
            assert isinstance(sink, AzureBlockSink)
            start = time.perf_counter()
            for offset in range(0, size, 4 * MiB):
                sink.write(offset, image[offset : offset + 4 * MiB])
            sink.commit()
            took_restore = time.perf_counter() - start
            compute.launch(spec, sink)
            arm_restore = len(fake.requests) - arm
            world.close()
    print(f"disk {size // MiB} MiB, fully written")
    print(
        f"capture: {blob_capture} blob requests ({blob_capture / gib:.0f}/GiB), {arm_capture} ARM "
        f"requests per capture, {read / MiB / took:.0f} MiB/s through Azurite"
    )
    print(
        f"restore: {sink.writes} blob requests ({sink.writes / gib:.0f}/GiB), {arm_restore} ARM "
        f"requests per restore with launch, {size / MiB / took_restore:.0f} MiB/s through Azurite"
    )


if __name__ == "__main__":
    main()
