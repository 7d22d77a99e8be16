"""`python -m lad_jax.train [--config configs/NAME.yaml] [key.sub=value ...]`: the LAD trainer entry point.

With no arguments it runs configs/default.yaml (the built-in "number with property P" experiment). Re-running the
same command resumes from the run directory's latest checkpoint; re-running a finished run prints its summary and
changes nothing (`--reevaluate` evaluates its newest checkpoint again instead).
"""
from __future__ import annotations

import argparse
import json
import sys

from lad_jax.cli_errors import main_with_clear_errors
from lad_jax.config import load_config


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m lad_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--init_from", default=None, help="HF checkpoint dir (same as init_from=...)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate the run's newest checkpoint again and write eval_step<N>.json (other files "
                             "unchanged); a finished run otherwise only prints its summary")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algorithm.loss=grpo")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the trainer; bad input raises (ConfigError, DataError, ...). The command line turns those into one line
    (`lad_jax.cli_errors`)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides) + ([f"init_from={args.init_from}"] if args.init_from else [])
    config = load_config(args.config, overrides)
    from lad_jax.trainer import Trainer, finished_summary

    if args.reevaluate:
        return Trainer(config).reevaluate()
    done = finished_summary(config)
    if done is not None:
        print(f"{config.run_dir} already finished {done['steps']} steps; nothing to do (raise steps= to train on, "
              f"--reevaluate to evaluate it again, or use another run_name). Its summary:\n"
              f"{json.dumps(done, indent=1)}", flush=True)
        return done
    return Trainer(config).run()


if __name__ == "__main__":
    main_with_clear_errors(main)
