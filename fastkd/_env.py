"""Every ``FASTKD_*`` environment switch: its one parser and its one table (docs/environment.md is
generated from ``SWITCHES``; a test keeps the two equal).

One truthy rule for every on/off switch: ``1``, ``true``, ``yes``, ``on`` are on; ``0``, ``false``,
``no``, ``off`` and the empty string are off (case and surrounding spaces ignored); anything else is an
error that names the variable, so a typo never silently means "off".

This module imports nothing of fastkd or torch: ``setup.py`` loads it by path to read the build switches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Switch", "SWITCHES", "flag", "value", "markdown_table"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Switch:
    name: str
    when: str  # "build", "import", "run", "make", "bench/gpu_check.sh"
    effect: str
    is_flag: bool = True  # on/off, parsed by flag(); otherwise a free value read by value()
    default: str = ""


SWITCHES: tuple[Switch, ...] = (
    Switch("FASTKD_SKIP_EXTENSION", "build",
           "install without compiling `fastkd._C` (pure-PyTorch kernels only)"),
    Switch("FASTKD_NO_CUDA", "build", "compile the C++ CPU kernels only, even with a CUDA build of torch and a "
           "toolkit (`make demo` sets it: a CPU-only machine has no use for the CUDA kernels)"),
    Switch("FASTKD_REQUIRE_CUDA", "build", "fail the build unless the CUDA kernels are compiled (`.ci/run` sets it)"),
    Switch("FASTKD_CUDA_ARCH_LIST", "build", "CUDA architectures, e.g. `\"9.0\"` (`TORCH_CUDA_ARCH_LIST` wins when "
           "set); default: the visible GPUs, or `8.0;9.0+PTX` (A100, H100/H200) with none visible",
           is_flag=False),
    Switch("FASTKD_DEBUG", "build", "`-O0 -g` (and `-G` for CUDA)"),
    Switch("FASTKD_CPU_ISA", "build", "`avx2` (default on x86-64: AVX2 kernels, plus the KD-loss kernel for "
           "AVX-512 in the module `fastkd._C_avx512`) or `default` (portable, for CPUs without AVX2)",
           is_flag=False),
    Switch("FASTKD_DISABLE_EXTENSION", "import", "use the pure-PyTorch kernels even where the extension is built"),
    Switch("FASTKD_REQUIRE_EXTENSION", "import", "a missing or broken extension is an `ImportError` with the "
           "reason, not a warning"),
    Switch("FASTKD_CPU_GRAD_CACHE", "import", "off: no cache of freed CPU gradient buffers (see docs/kernels.md); "
           "`fastkd.empty_cache()` frees it", default="1"),
)
_BY_NAME = {s.name: s for s in SWITCHES}


def _switch(name: str) -> Switch:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"fastkd._env: {name} is not a fastkd switch; add it to SWITCHES") from None


def flag(name: str, environ=None) -> bool:
    """The on/off switch ``name`` under the one truthy rule (module docstring); ValueError on any other text."""
    sw = _switch(name)
    if not sw.is_flag:
        raise TypeError(f"fastkd._env: {name} is a value, not an on/off switch; read it with value()")
    raw = (os.environ if environ is None else environ).get(name, sw.default)
    text = raw.strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of 1/true/yes/on or 0/false/no/off "
                     f"(unset means {'on' if sw.default in _ON else 'off'})")


def value(name: str, environ=None) -> str | None:
    """The free-valued switch ``name`` (stripped), or its default (None when it has none)."""
    sw = _switch(name)
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    return raw or (sw.default or None)


def markdown_table() -> str:
    """The switches as the markdown table of docs/environment.md."""
    rows = ["| variable | when | effect |", "|---|---|---|"]
    for s in SWITCHES:
        shown = f"`{s.name}=1`" if s.is_flag and s.default != "1" else (
            f"`{s.name}=0`" if s.is_flag else f"`{s.name}`")
        rows.append(f"| {shown} | {s.when} | {s.effect} |")
    return "\n".join(rows) + "\n"
