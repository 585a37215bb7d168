"""XManager launcher for `python -m free_jax.train` on TPU pods and GPU machines.

    python launch/xm_launch.py --gin_file=gin_configs/runs/finetune.gin \
        --gin.MODEL_DIR=\"gs://bucket/runs/free\" --platform=tpu --accelerator=v4 --topology=2x2x2
    python launch/xm_launch.py ... --dry_run     # prints the job spec; needs no cloud account

gin files and `--gin.KEY=VALUE` bindings pass through to the trainer unchanged. Requires the `xm`
extra (`pip install 'free_jax[xm]'`) for a real launch; `--dry_run` works without it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

ACCELERATORS = {"tpu": ("v4", "v5e", "v5p", "v6e"), "gpu": ("h100", "a100", "l4", "v100")}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[], help="repeatable")
    parser.add_argument("--platform", choices=sorted(ACCELERATORS), default="tpu")
    parser.add_argument("--accelerator", default=None, help="e.g. v4 (TPU) or h100 (GPU)")
    parser.add_argument("--topology", default="2x2", help="TPU topology, e.g. 2x2x2")
    parser.add_argument("--num_gpus", type=int, default=8, help="GPUs per host (GPU only)")
    parser.add_argument("--num_hosts", type=int, default=1, help="hosts (GPU only)")
    parser.add_argument("--experiment_title", default="free_jax")
    parser.add_argument("--module", default="free_jax.train", help="entry point module")
    parser.add_argument("--dry_run", action="store_true", help="print the job spec and exit")
    args, rest = parser.parse_known_args(argv)
    bindings = [a for a in rest if a.startswith("--gin.")]
    unknown = [a for a in rest if not a.startswith("--gin.")]
    if unknown:
        parser.error(
            f"unrecognised arguments: {' '.join(unknown)} (bindings look like --gin.KEY=VALUE)"
        )
    if not args.gin_file:
        parser.error("at least one --gin_file is required")
    accel = args.accelerator or ACCELERATORS[args.platform][0]
    if accel not in ACCELERATORS[args.platform]:
        parser.error(
            f"--accelerator={accel} is not a {args.platform} accelerator {ACCELERATORS[args.platform]}"
        )
    args.accelerator = accel
    return args, bindings


def trainer_args(args: argparse.Namespace, bindings: list[str]) -> list[str]:
    """The trainer's own command line: gin files first, then bindings in the order given."""
    return [f"--gin_file={f}" for f in args.gin_file] + bindings


def job_spec(args: argparse.Namespace, bindings: list[str]) -> dict:
    """A plain description of the job, printed by --dry_run and used to build the XManager job."""
    if args.platform == "tpu":
        resources = {"tpu": args.accelerator, "topology": args.topology}
        # Every host of a pod slice runs the trainer; JAX reads the slice's own metadata to find
        # its peers (on a one-host slice initialize() is harmless).
        env = {"FREE_JAX_DISTRIBUTED": "auto"}
    else:
        resources = {"gpu": args.accelerator, "count": args.num_gpus, "hosts": args.num_hosts}
        # One process per host; free_jax.train reads these to call jax.distributed.initialize.
        env = {"FREE_JAX_NUM_PROCESSES": str(args.num_hosts)}
    cmd = ["python", "-m", args.module, *trainer_args(args, bindings)]
    return {
        "experiment_title": args.experiment_title,
        "platform": args.platform,
        "resources": resources,
        "env": env,
        "command": cmd,
        "command_line": shlex.join(cmd),
    }


def launch(spec: dict) -> None:  # pragma: no cover - needs a cloud account
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise SystemExit(
            "xmanager is not installed: pip install 'free_jax[xm]' (or use --dry_run)"
        ) from e

    with xm_local.create_experiment(experiment_title=spec["experiment_title"]) as experiment:
        [executable] = experiment.package(
            [
                xm.python_container(
                    executor_spec=xm_local.Vertex.Spec(),
                    path=".",
                    entrypoint=xm.ModuleName(spec["command"][2]),
                )
            ]
        )
        if spec["platform"] == "tpu":
            requirements = xm.JobRequirements(**{spec["resources"]["tpu"]: 1})
        else:
            requirements = xm.JobRequirements(
                **{spec["resources"]["gpu"]: spec["resources"]["count"]}
            )
        experiment.add(
            xm.Job(
                executable=executable,
                executor=xm_local.Vertex(requirements=requirements),
                args=spec["command"][3:],
                env_vars=spec["env"],
            )
        )


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    spec = job_spec(args, bindings)
    if args.dry_run:
        print(json.dumps(spec, indent=2))
        return 0
    launch(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
