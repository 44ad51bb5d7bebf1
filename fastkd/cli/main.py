"""The ``fastkd`` commands: argument parsing and ``main`` (the console script; also ``python -m fastkd``)."""

from __future__ import annotations

import argparse
import sys
import time

from .._suggest import did_you_mean
from .config import ConfigError, load_config
from .distill import run_cache_teacher, run_distill, run_resume

__all__ = ["main"]


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    from ..demos.byte_lm import LMDemoConfig  # noqa: PLC0415
    from ..demos.digits import DemoConfig  # noqa: PLC0415  (dataclass only; no sklearn import)

    # allow_abbrev=False: a mistyped option is an error with a suggestion, never silently another option.
    p = argparse.ArgumentParser(prog="fastkd", description="Knowledge distillation with fused PyTorch ops.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs = {}

    def from_dataclass(sp, cls, help_):
        for name, f in cls.__dataclass_fields__.items():
            flag = "--" + name.replace("_", "-")
            if name == "out":
                sp.add_argument(flag, default=None, help="run folder (default: runs/<command>-<time>)")
            else:
                sp.add_argument(flag, type=type(f.default), default=f.default, help=f"{help_.get(name, '')} "
                                f"(default: {f.default})".strip())

    demo = sub.add_parser("demo", allow_abbrev=False,
                          help="digits: teacher vs student from scratch vs distilled student")
    from_dataclass(demo, DemoConfig, {"seeds": "seeds (teacher, scratch and distilled student each)",
                                      "threads": "torch threads per process; 0 = torch's default",
                                      "workers": "processes the seeds run in; 0 = one per CPU core"})
    subs["demo"] = demo
    lm = sub.add_parser("lm-demo", allow_abbrev=False,
                        help="token-level: distil a byte-level transformer LM (stdlib sources)")
    from_dataclass(lm, LMDemoConfig, {"top_k": "comma-separated K, e.g. 8,32: per K a student distilled offline "
                                      "from a cache of the teacher's top-K logits (empty: none)"})
    subs["lm-demo"] = lm
    dist = sub.add_parser("distill", allow_abbrev=False,
                          help="distil your own teacher into your student (TOML config)")
    dist.add_argument("--config", required=True, help="TOML file (see the README, section fastkd distill)")
    dist.add_argument("--out", default=None, help="run folder (overrides `out` in the config)")
    subs["distill"] = dist
    res = sub.add_parser("resume", allow_abbrev=False,
                         help="continue a `fastkd distill` run from its last checkpoint")
    res.add_argument("run_dir", help="the run folder")
    res.add_argument("--checkpoint", default="last",
                     help="last (default), best, or the path of a checkpoint of this run")
    subs["resume"] = res
    cache = sub.add_parser("cache-teacher", allow_abbrev=False,
                           help="run a distill config's teacher once over its data into a top-k teacher cache")
    cache.add_argument("--config", required=True, help="the distill config (TOML) whose teacher and data to use")
    cache.add_argument("--top-k", type=int, required=True, help="teacher logits kept per position")
    cache.add_argument("--out", required=True, help="the cache folder (train/ and, with data.eval, eval/ in it); "
                       "use it as `[teacher] cache = \"OUT\"`")
    cache.add_argument("--batch-size", type=int, default=8, help="examples per teacher call (default: 8)")
    cache.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                       help="the stored logits' dtype (default: float16)")
    cache.add_argument("--device", default=None, help="where the teacher runs (default: where its weights are)")
    subs["cache-teacher"] = cache
    return p, subs


def _unknown_option_error(parser, subs, argv, unknown) -> str:
    command = next((a for a in argv if a in subs), None)
    options = [o for a in (subs[command] if command else parser)._actions for o in a.option_strings]
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if flags:
        msgs = [f"unknown option {f!r}{did_you_mean(f, options)}" for f in flags]
    else:
        msgs = [f"unexpected argument {u!r}" for u in unknown]
    return "; ".join(msgs) + f". See `fastkd {command or ''} --help`.".replace("  ", " ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = _parser()
    if argv and not argv[0].startswith("-") and argv[0] not in subs:
        print(f"fastkd: error: unknown command {argv[0]!r}{did_you_mean(argv[0], subs)}; commands: "
              f"{', '.join(subs)}", file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"fastkd: error: {_unknown_option_error(parser, subs, argv, unknown)}", file=sys.stderr)
        return 2

    from ..train.checkpoint import CheckpointError  # noqa: PLC0415
    from ..train.run_dir import RunDirError  # noqa: PLC0415

    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.command in ("demo", "lm-demo"):
            from dataclasses import fields  # noqa: PLC0415

            if args.command == "demo":
                from ..demos.digits import DemoConfig as C, run_demo as run  # noqa: I001, PLC0415  (the demo's packages only when it runs)
            else:
                from ..demos.byte_lm import LMDemoConfig as C, run_lm_demo as run  # noqa: I001, PLC0415
            values = {f.name: getattr(args, f.name) for f in fields(C)}
            values["out"] = values["out"] or f"runs/{args.command}-{stamp}"
            run(C(**values))
        elif args.command == "distill":
            run_distill(load_config(args.config), args.out)
        elif args.command == "resume":
            run_resume(args.run_dir, args.checkpoint)
        elif args.command == "cache-teacher":
            run_cache_teacher(load_config(args.config), args.out, args.top_k, batch_size=args.batch_size,
                              dtype=args.dtype, device=args.device)
    except (ConfigError, RunDirError, CheckpointError, ValueError) as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastkd: interrupted; the last checkpoint is intact (continue with `fastkd resume RUN_DIR`)",
              file=sys.stderr)
        return 130
    return 0
