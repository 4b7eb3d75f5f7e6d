import os
import tempfile

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    # Triton kernels run interpreted where there is no GPU. Triton reads this when @triton.jit
    # decorates, so it must be set before any test module imports a kernel module.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Answers depend on the user's tuning cache, quarantine file and forced backend: the suite
# starts from none of them (tests that need one pass it explicitly).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="quantoracle-tests-cache-")
for variable in ("QUANTORACLE_TUNING", "QUANTORACLE_QUARANTINE", "QUANTORACLE_BACKEND", "QUANTORACLE_VERIFY"):
    os.environ.pop(variable, None)

# The suite runs tiny tensors: OpenMP threads only add contention (a 16x64 index_add_ took
# ~1 ms with 2 threads on a loaded 2-core machine, 6 us with one).
torch.set_num_threads(1)

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
