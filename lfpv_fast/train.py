"""Train LFPVNet. With no arguments: the built-in demo (a small model on a synthetic low-light set, minutes on a CPU).

    python -m lfpv_fast.train                                   # demo: configs/demo.yaml -> runs/demo-<time>
    python -m lfpv_fast.train -c smid --set data.lq_root=/data/SMID_LQ_np --set data.gt_root=/data/SMID_Long_np
    python -m lfpv_fast.train --out runs/smid --resume          # continue from the run's latest checkpoint
    torchrun --nproc_per_node 8 -m lfpv_fast.train -c smid --out runs/smid ...   # data parallel
    torchrun --nnodes 2 ... -m lfpv_fast.train --out runs/smid --resume auto ...   # several machines (README)

-c takes a path or a packaged config name (demo, smid). --set section.key=value overrides a key (repeatable).
--out is the run folder (default runs/<config name>-<YYYYmmdd-HHMMSS>); --resume continues the run in --out from
its latest checkpoint that can be read (a damaged newer one is skipped, with a message), or from the checkpoint
given (its run folder is then the default --out); without -c a resumed run reads the run folder's config.yaml,
so `--out DIR --resume --set train.iterations=N` extends a run. --resume auto (what a restarting launcher passes every
time): the latest checkpoint in --out if there is one, else a new run; in a folder with run files but no checkpoint
only when its config.yaml is this run's config (a run that stopped before its first checkpoint), and never over
exported weights. A folder holding any run file (config, log, metrics, weights, checkpoints) is a run: a new run
(no --resume) there is refused. A run holds an exclusive lock on its folder (DIR/.lock, flock; under torchrun
rank 0 holds it) until it ends: a second process on the folder stops at once, naming the holder's PID.
A resume that cannot start (a bad checkpoint, setting or data file) exits 2 having changed nothing in the run
folder; newer checkpoints of an abandoned continuation are set aside (.abandoned) only once training resumes.
Exit status: 0 done or stopped by SIGINT/SIGTERM (after a checkpoint that every rank agreed on); 1 non-finite loss
(with train.nonfinite=skip: train.max_consecutive_skips skipped steps in a row, or every step skipped), a
checkpoint that could not be written (a full disk; the files written before stay intact), or under torchrun a rank
that died or stalled past train.dist_timeout_s (named in the error line); 2 bad arguments, config, checkpoint, data
or run folder (one line on stderr starting with "error:"; under torchrun from the first rank that found it, the
others stop with 2 silently); 130 a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from lfpv_fast.cli import ArgumentParser, fail
from lfpv_fast.config import ConfigError, RunConfig, load_config
from lfpv_fast.data.errors import DataError
from lfpv_fast.io.files import OutputWriteError
from lfpv_fast.training import distributed
from lfpv_fast.training.fast_path import resolve_features
from lfpv_fast.training.run_folder import RunFolder, RunLock, run_dir_of_checkpoint
from lfpv_fast.training.trainer import Trainer

DEMO_CONFIG = "demo"


def build_parser() -> ArgumentParser:
    doc = (__doc__ or "").split("\n\n")
    ap = ArgumentParser(prog="python -m lfpv_fast.train", description=doc[0],
                                 epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", help="run config: a YAML path or a packaged name (default: demo)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.iterations=1000 (repeatable)")
    ap.add_argument("--out", help="run folder (default: runs/<config name>-<YYYYmmdd-HHMMSS>)")
    ap.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                    help="continue from CHECKPOINT, or with no value from the latest checkpoint in --out; 'auto': "
                         "the latest checkpoint in --out if there is one, else a new run")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resume_run_dir(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: DIR for DIR/checkpoints/step_N.pth, else the file's folder."""
    return run_dir_of_checkpoint(checkpoint)


def load_run_config(args: argparse.Namespace) -> RunConfig:
    run_dir = Path(args.out).expanduser() if args.out else resume_run_dir(Path(args.resume)) \
        if args.resume not in (None, "latest", "auto") else None
    if args.config is None and args.resume is not None and run_dir is not None:
        saved = RunFolder(run_dir).config
        if saved.is_file():
            return load_config(saved, args.overrides)
    return load_config(args.config or DEMO_CONFIG, args.overrides)


def choose_run_dir(args: argparse.Namespace, cfg: RunConfig, info: distributed.DistInfo) -> Path:
    if args.out:
        return Path(args.out).expanduser()
    if args.resume not in (None, "latest", "auto"):
        return resume_run_dir(Path(args.resume))
    if args.resume == "latest":
        raise ConfigError("--resume without a checkpoint path needs --out DIR (the run folder to continue)")
    if args.resume == "auto":
        raise ConfigError("--resume auto needs --out DIR (the run folder to continue or start)")
    name = [f"runs/{Path(cfg.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if info.enabled:  # every rank must write to the folder rank 0 named
        dist.broadcast_object_list(name, src=0, group=info.control_group)
    return Path(name[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Everything about the config is checked here, before any process group, data or model exists.
        cfg = load_run_config(args)
        features = resolve_features(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    except (ConfigError, DataError, OSError, ValueError) as exc:
        return fail(str(exc))
    info = distributed.init(features.device.type == "cuda", timeout_s=cfg.train.dist_timeout_s)
    heartbeat = distributed.Heartbeat.start(info)
    trainer: Trainer | None = None
    lock: RunLock | None = None
    where = f"rank {info.rank}: " if info.enabled else ""
    try:
        run_dir = choose_run_dir(args, cfg, info)
        # Rank 0 holds the run folder's lock for the whole run; every rank learns whether it got it.
        lock = distributed.on_every_rank(lambda: RunFolder(run_dir).lock() if info.is_main else None, info)
        trainer = Trainer(cfg, run_dir, resume=args.resume, dist_info=info, features=features)
        warning = distributed.restart_warning()
        if warning:
            trainer.log(warning)
        return trainer.fit()
    except distributed.OtherRankFailed:  # that rank prints the error line
        return 2
    except OutputWriteError as exc:  # a failure during the work (a full disk), not an input error
        fail(where + str(exc))
        return 1
    except (ConfigError, DataError, OSError, ValueError) as exc:
        return fail(where + str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint for the step in progress
        last = trainer.last_checkpoint if trainer is not None else None
        print(f"interrupted; last checkpoint: {last}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not (info.enabled and distributed.is_lost_peer_error(exc)):
            raise
        # A rank died or stalled: fail within train.dist_timeout_s, naming it, instead of hanging.
        last = trainer.last_checkpoint if trainer is not None else None
        saved = f"last checkpoint {last}" if last else "no checkpoint yet"
        fail(f"{where}lost {distributed.describe_lost(heartbeat)} of {info.world_size} (it died, or stalled past "
             f"train.dist_timeout_s={cfg.train.dist_timeout_s:g} s); {saved} (torchrun --max-restarts with "
             f"--resume auto continues from the newest one) ({str(exc).splitlines()[0][:160]})")
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        if heartbeat is not None:
            heartbeat.stop()
        distributed.shutdown(info)
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    code = main()
    if distributed.launched_by_torchrun():
        distributed.exit_without_finalizing(code)
    sys.exit(code)
