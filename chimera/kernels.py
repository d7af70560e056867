"""Optional fused CPU kernels, compiled on first use with the machine's C++ compiler.

``torch.utils.cpp_extension.load`` builds ``chimera/csrc/*.cpp`` once per machine into torch's
extension cache (``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``); later processes,
Ray workers included, load the cached library in well under a second. Concurrent builds are
serialised by an ``flock`` that the kernel releases when its holder dies: torch's own lock file
stays behind when a building process is killed (a Ray worker killed as hung, Ctrl-C, the OOM
killer) and would make every later process wait on it forever, so under our lock a leftover
torch lock file is known to be stale and is removed. Without a compiler (or with
``CHIMERA_FUSED_KERNELS=0``) the model runs the eager PyTorch path, which computes the same
function; a warning says why once.

The build uses ``-march=native`` (the cache is per machine) and ``-ffast-math`` at compile time
only, so that gcc vectorises ``exp`` through glibc's vector maths library; it is not passed to
the linker, which would otherwise switch the whole process to flush-denormals-to-zero.
``-fopenmp`` makes ``at::parallel_for`` use torch's own OpenMP thread pool (see the source).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCES = Path(__file__).parent / "csrc"
DISABLE_VARIABLE = "CHIMERA_FUSED_KERNELS"


def fused_kernels_enabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "no")


def fused_kernels_apply(*tensors: torch.Tensor) -> bool:
    """The kernels take fp32 CPU tensors; anything else (CUDA, bf16, float64) runs eagerly."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and fused_ops() is not None)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary sits in the environment's bin,
    which is not on PATH when the environment is used without being activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def _exclusive_build(build_directory: Path):
    """Hold an exclusive lock on ``build_directory`` (released by the kernel if we die), and
    clear torch's lock file, which under this lock can only be a dead builder's."""
    build_directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file is all there is
        yield
        return
    with open(build_directory.parent / f"{build_directory.name}.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def fused_ops():
    """``torch.ops.chimera`` (``rglru_``, ``causal_conv_`` and ``gelu_gate_`` ``forward`` /
    ``backward``), or None where the library cannot be built."""
    if not fused_kernels_enabled():
        return None
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        # One build per Python and torch version, as torch's default directory layout does.
        build_directory = (Path(cpp_extension.get_default_build_root())
                           / f"py{sys.version_info.major}{sys.version_info.minor}_torch"
                             f"{torch.__version__}" / "chimera_kernels")
        with _exclusive_build(build_directory):
            cpp_extension.load(
                name="chimera_kernels", sources=sorted(str(p) for p in SOURCES.glob("*.cpp")),
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"], build_directory=str(build_directory),
                is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, no headers: the eager path still works
        warnings.warn(f"fused CPU kernels unavailable, using the eager path ({error}); set "
                      f"{DISABLE_VARIABLE}=0 to skip the build", RuntimeWarning, stacklevel=2)
        return None
    return torch.ops.chimera
