"""apo_jax: align language models with preference pairs (APO, DPO and relatives) in JAX/Flax."""

import os
import re

# apo_jax uses transformers for tokenizers only; without torch installed, transformers would print
# an advisory about missing models at import. An explicit TRANSFORMERS_VERBOSITY still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _threads_for_simulated_devices() -> None:
    """Gives a simulated CPU pod enough XLA threads that its collectives cannot starve.

    XLA:CPU runs every device of a process on one thread pool of max(cores, devices) threads,
    and a blocked collective holds its thread. One device can have two collectives in flight
    (a scanned layer's body and the code around it), so with 8 simulated devices on a 2-core
    machine all 8 threads can end up waiting for a device that has no thread left: XLA aborts
    the process after 40 s ("Termination timeout for `all reduce RendezvousKey...`"). Four
    threads per device removes that; blocked threads cost no CPU. PJRT_NPROC or NPROC, when
    set, win. This must run before JAX creates its CPU client, which is why it lives here.
    """
    if "PJRT_NPROC" in os.environ or "NPROC" in os.environ:
        return
    found = re.findall(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    counts = [int(n) for n in found]
    if os.environ.get("JAX_NUM_CPU_DEVICES", "").isdigit():
        counts.append(int(os.environ["JAX_NUM_CPU_DEVICES"]))
    devices = max(counts, default=0)
    if devices > 1:
        os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 4 * devices))


_threads_for_simulated_devices()

__version__ = "0.1.0"
