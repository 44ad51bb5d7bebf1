"""Build of fastkd's extension module ``fastkd._C`` (everything else is in pyproject.toml).

The C++ CPU kernels are always built; the CUDA kernels too whenever torch is a CUDA build and a
CUDA toolkit is found (no GPU is needed to compile them). The build switches are parsed by
fastkd/_env.py (the one parser and table of every FASTKD_* switch; docs/environment.md).
"""

import glob
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_env_module():
    """fastkd/_env.py, by path: the package itself (and torch) must not be imported to build it."""
    spec = importlib.util.spec_from_file_location("_fastkd_env", ROOT / "fastkd" / "_env.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_env = _load_env_module()
_flag = _env.flag


def _real_cuda_home() -> str | None:
    """The toolkit folder that holds lib64/libcudart.so.

    torch guesses CUDA_HOME from the location of ``nvcc``; where ``nvcc`` on PATH is a wrapper
    script (as on our build machines) that guess is wrong and linking fails with
    ``cannot find -lcudart``. nvcc itself reports where it lives (``_HERE_``) in the ``--dryrun``
    listing of a compile.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]

    def has_cudart(home) -> bool:
        return any(Path(home, lib, "libcudart.so").exists() for lib in ("lib64", "lib"))

    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        guess = Path(nvcc).resolve().parent.parent
        if has_cudart(guess):
            return str(guess)
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ _HERE_="):
                    home = Path(line.split("=", 1)[1].strip()).parent
                    if has_cudart(home):
                        return str(home)
        except (OSError, subprocess.SubprocessError):
            pass
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if has_cudart(cand):
            return cand
    return None


SKIP = _flag("FASTKD_SKIP_EXTENSION")
REQUIRE_CUDA = _flag("FASTKD_REQUIRE_CUDA")
DEBUG = _flag("FASTKD_DEBUG")
WANT_CUDA = not _flag("FASTKD_NO_CUDA")

if not SKIP and WANT_CUDA:
    home = _real_cuda_home()
    if home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = home

ext_modules = []
cmdclass = {}
if not SKIP:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_ok = WANT_CUDA and torch.version.cuda is not None and CUDA_HOME is not None
    if REQUIRE_CUDA and not cuda_ok:
        sys.exit(
            "FASTKD_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}. "
            "Install a CUDA build of torch and a CUDA toolkit, or set CUDA_HOME to the toolkit folder."
        )

    # csrc/<folder>/... (one folder per op, common/, cpu_isa/) and csrc/module.cpp. Files named
    # *_avx512.cpp make up the module fastkd._C_avx512 (below), every other .cpp and .cu fastkd._C.
    # Includes are written from csrc/: #include "kd_loss/kd_loss.h".
    def csrc_files(pattern):
        return sorted(str(f.relative_to(ROOT)) for f in (ROOT / "csrc").rglob(pattern))

    avx512_sources = csrc_files("*_avx512.cpp")
    sources = [f for f in csrc_files("*.cpp") if f not in avx512_sources]
    include_dirs = [str(ROOT / "csrc")]
    define_macros = []
    # No -std flag: torch.utils.cpp_extension passes the standard its headers need (C++17 or C++20).
    # -g0: no debug information in release builds (Python's own CFLAGS carry -g); it was a third of
    # the CPU kernels' compile time. FASTKD_DEBUG=1 builds with it.
    cxx = ["-O3", "-g0"] if not DEBUG else ["-O0", "-g"]
    cxx.append("-Wno-unknown-pragmas")  # torch's headers carry CUDA-only `#pragma unroll` lines
    # No implicit fused multiply-adds (GCC's default for C++ contracts a * b + c, vector intrinsics
    # included): a value computed in two places must round the same way in both (e.g. a = s / T in
    # the KD kernel's sweeps). Fused multiply-adds are written out where they are wanted.
    cxx.append("-ffp-contract=off")
    cxx.append("-fopenmp")
    # at::vec::Vectorized is selected at compile time by CPU_CAPABILITY. x86-64 machines from the
    # last decade have AVX2 + FMA; FASTKD_CPU_ISA=default builds the portable (scalar-width) code.
    # With avx2, the KD-loss row kernel is also compiled for AVX-512 into the module fastkd._C_avx512
    # (a module of its own: its flags then touch no code that other CPUs run); fastkd uses it where
    # torch itself runs AVX-512 kernels.
    isa = _env.value("FASTKD_CPU_ISA") or ("avx2" if platform.machine() in ("x86_64", "AMD64") else "default")
    base_cxx = list(cxx)
    if isa == "avx2":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        define_macros.append(("FASTKD_CPU_ISA", '"avx2"'))
        # GCC's own AVX-512 headers start many intrinsics from a deliberately uninitialised register
        # (`__m512 __Y = __Y;` in _mm512_undefined_ps and friends, the "don't care" operand of a
        # masked instruction); inlined into at::vec's AVX-512 code, every such use is reported as
        # -Wmaybe-uninitialized (and a few as -Wuninitialized): ~400 warnings, none about our code.
        # They are turned off for this module only; fastkd._C keeps both.
        avx512_warnings = ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
        ext_modules.append(CppExtension(
            "fastkd._C_avx512", avx512_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": base_cxx + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                                                   "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
                                                   "-DCPU_CAPABILITY_AVX512"] + avx512_warnings},
            extra_link_args=["-fopenmp"],
        ))
    elif isa == "default":
        cxx += ["-DCPU_CAPABILITY=DEFAULT"]
        define_macros.append(("FASTKD_CPU_ISA", '"default"'))
    else:
        sys.exit(f"FASTKD_CPU_ISA={isa!r}: expected 'avx2' or 'default'")

    if cuda_ok:
        sources += csrc_files("*.cu")
        define_macros.append(("FASTKD_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if _env.value("FASTKD_CUDA_ARCH_LIST"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = _env.value("FASTKD_CUDA_ARCH_LIST")
            elif not torch.cuda.is_available():
                # No GPU to ask: A100 and H100/H200 (where we measure), PTX for newer chips.
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        # torch's CUDA headers include cusparse.h; some toolkits lack it, the nvidia-cusparse wheel
        # that comes with CUDA builds of torch ships it.
        if not Path(CUDA_HOME, "include", "cusparse.h").exists():
            for site in sys.path:
                for cand in glob.glob(os.path.join(site, "nvidia", "*", "include")):
                    if os.path.exists(os.path.join(cand, "cusparse.h")):
                        include_dirs.append(cand)
                        break
        nvcc = ["-O3", "-lineinfo"] if not DEBUG else ["-O0", "-G", "-g"]
        ext = CUDAExtension(
            "fastkd._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastkd._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    ext_modules.insert(0, ext)
    variant = "cuda" if cuda_ok else "cpu"

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, with the object files of the C++-only and the C++ + CUDA builds in
        folders of their own (build/temp-cpu, build/temp-cuda): `make demo` builds the first, `make test`
        the second, and switching between them relinks instead of recompiling everything."""

        def finalize_options(self):
            if self.build_temp is None:
                self.build_temp = str(Path("build") / f"temp-{variant}")
            super().finalize_options()

    cmdclass["build_ext"] = BuildExt

setup(ext_modules=ext_modules, cmdclass=cmdclass)
