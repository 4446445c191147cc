"""Training entry point: config -> Trainer -> train -> close.

Runs the same way as a plain process (`python -m pretrain.train CONFIG`), under torchrun
(`torchrun --nproc-per-node N -m pretrain.train CONFIG`), under the deepspeed launcher
(`deepspeed --num_gpus N --module pretrain.train CONFIG`), as one srun task per rank
(`srun python -m pretrain.train CONFIG`, what `pretrain submit train` runs) and from
`pretrain train`.

A collective that times out (parallel.timeout_minutes) ends the rank with exit 1 and an error
that names the ranks that did not arrive (pretrain/hang.py); a run whose losses stay non-finite
after its rollbacks (pretrain/bad_steps.py) ends with exit 1 and says so.

SIGUSR1 and SIGTERM ask the run to stop: the ranks agree on a step, save a checkpoint there and
exit 0 (pretrain/stop.py). When PRETRAIN_STATUS_FILE is set, rank 0 writes how the run ended
into it (`finished <step>` or `stopped <signal> <step>`): the sbatch script reads it to decide
whether to requeue the job.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_pipeline.format import atomic_write_text
from launch.env import LaunchEnvError, export_torch_env, free_port, read_dist_env
from pretrain.config_io import ConfigError, load_config
from pretrain.stop import StopRequest

STATUS_FILE_VAR = "PRETRAIN_STATUS_FILE"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pretrain.train", description=__doc__)
    parser.add_argument("config", help="YAML run config, e.g. configs/gpt-default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Installed first: a signal that arrives during setup is honoured at the first step.
    stop = StopRequest().install()
    try:
        env = read_dist_env()
        cfg = load_config(args.config, args.overrides, world_size=env.world_size)
    except (ConfigError, LaunchEnvError) as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    if env.launcher == "single":
        # A plain process is a world of one; DeepSpeed still wants a process group.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    elif env.launcher == "slurm":
        export_torch_env(env)

    # heavy imports after the config is good
    from pretrain.bad_steps import TrainingDiverged
    from pretrain.hang import RollCall, is_collective_timeout
    from data_pipeline.shard_reader import ShardError
    from pretrain.checkpoint import CheckpointError
    from pretrain.trainer import SetupError, Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, env, stop=stop)
        summary = trainer.train()
    except SetupError as e:
        if env.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:  # damaged data: the message names the shard, position and fix
        print(f"error: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.metrics.close()
        # Not trainer.close(): its barrier would wait for ranks that are in a collective of the
        # step (another rank's shard may be fine) until the collective timeout. Exiting ends
        # this rank's connections, and the launcher (torchrun, srun --kill-on-bad-exit) stops
        # the others at once.
        os._exit(2)
    except TrainingDiverged as e:  # raised on every rank at the same step
        if env.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        trainer.close()
        return 1
    except CheckpointError as e:  # e.g. a full disk: the message says what is left, what to do
        if env.rank == 0:  # every rank has the same error (the ranks agree on a save's outcome)
            print(f"error: {e}", file=sys.stderr, flush=True)
        trainer.close()
        return 1
    except RuntimeError as e:
        import torch.distributed as dist

        if not (is_collective_timeout(e) and dist.is_initialized()):
            if trainer is not None:
                trainer.close(ok=False)
            raise
        # A rank did not arrive: name it, then leave at once (a barrier or the process group's
        # teardown would wait for it again).
        rollcall = trainer.rollcall if trainer is not None else RollCall(
            env.rank, env.world_size, cfg.parallel.timeout_minutes * 60, env.restart_count)
        error = rollcall.error(e, trainer.phase if trainer is not None else "setup")
        if env.rank == min(set(range(env.world_size)) - set(error.missing), default=env.rank):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except BaseException:
        if trainer is not None:
            trainer.close(ok=False)
        raise
    trainer.close()
    status_file = os.environ.get(STATUS_FILE_VAR)
    if status_file and env.rank == 0:
        how = (f"stopped {summary['stopped_by']}" if summary.get("stopped_by") else "finished")
        atomic_write_text(status_file, f"{how} {summary['step']}\n")
    stop.ignore_from_now()
    return 0


if __name__ == "__main__":
    sys.exit(main())
