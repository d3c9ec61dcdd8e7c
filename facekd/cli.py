"""The ``facekd`` command line (also ``python -m facekd``): data, train, submit, jobs, eval, import, centres, export,
analyze, demo, report, bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from facekd.errors import ConfigError, DataError, FacekdError, TrainingError

__all__ = ["main"]

logger = logging.getLogger("facekd")


def _data_synth(args: argparse.Namespace) -> None:
    from facekd.data.synth import synthesize

    summary = synthesize(
        args.out, num_identities=args.identities, images_per_identity=args.images_per_identity,
        num_val_identities=args.val_identities, num_pairs=args.pairs, image_size=args.image_size,
        seed=args.seed, overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))


def _data_synth_landmarks(args: argparse.Namespace) -> None:
    from facekd.data.synth_landmarks import synthesize_landmarks

    manifest = synthesize_landmarks(
        args.out, num_identities=args.identities, images_per_identity=args.images_per_identity,
        num_val_identities=args.val_identities, val_images_per_identity=args.val_images_per_identity,
        image_size=args.image_size, shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite,
    )
    splits = manifest["splits"]
    print(f"{splits['train']['num_samples']} training and {splits['val']['num_samples']} held-out faces with 5 and "
          f"68 landmarks under {args.out} (manifest.json)")


def _data_convert(args: argparse.Namespace) -> None:
    from facekd.data.convert import convert_to_shards

    manifest = convert_to_shards(
        args.source, args.out, shard_size=args.shard_size, shuffle=not args.no_shuffle, seed=args.seed,
        num_workers=args.workers,
    )
    print(f"{manifest['num_samples']} samples of {manifest['num_classes']} identities in "
          f"{len(manifest['shards'])} shards under {args.out} ({manifest['num_corrupt']} corrupt images dropped)")


def _data_inspect(args: argparse.Namespace) -> None:
    from facekd.data.convert import inspect_dataset

    summary = inspect_dataset(args.path, verify_digests=not args.quick)
    print(json.dumps(summary, indent=2))
    if summary.get("ok") is False:
        raise DataError(f"{args.path}: some shards are missing, damaged or disagree with the manifest (see 'status' above)")


def _train(args: argparse.Namespace) -> None:
    from facekd.config import load_job

    job = load_job(args.job, args.set)  # checked here, before any rank starts
    if _is_landmark_job(job):
        _train_landmarks(job, args)
        return
    if args.ray:
        _train_on_ray(job, args)
        return
    if args.nproc_per_node is not None:
        from facekd.ray_train import check_before_launch

        check_before_launch(job, args.nproc_per_node)
        _launch_local(args)
        return
    from facekd.distributed.world import launched_by_a_launcher
    from facekd.train import Trainer

    trainer = Trainer(job, resume=args.resume)
    summary = trainer.fit()  # on an error the launcher ends the other ranks: no collective teardown then
    world, main = trainer.world, trainer.world.is_main
    del trainer  # the engine and its communication buffers go before the process group
    if launched_by_a_launcher():
        world.close()
    if main:
        print(json.dumps(summary, indent=2))


def _is_landmark_job(job) -> bool:
    from facekd.config import LandmarkJobConfig

    return isinstance(job, LandmarkJobConfig)


def _train_landmarks(job, args: argparse.Namespace) -> None:
    """A landmark job (``task: landmarks``): the FAN trains in this one process."""
    from facekd.landmarks import LandmarkTrainer

    if args.ray or args.nproc_per_node is not None:
        raise ConfigError(f"{args.job} is a landmark job (task: landmarks), which trains in one process: drop "
                          f"{'--ray' if args.ray else '--nproc-per-node'}")
    summary = LandmarkTrainer(job, resume=args.resume).fit()
    print(json.dumps(summary, indent=2))


def _train_on_ray(job, args: argparse.Namespace) -> None:
    """``--ray``: the job on Ray Train workers of a cluster (``--address``) or of a Ray started here."""
    from facekd.distributed.ray_launch import check_address
    from facekd.ray_train import ray_settings, train_on_ray

    if args.nproc_per_node is not None:
        raise ConfigError("--ray and --nproc-per-node are two launchers: give one (--workers sets Ray's ranks)")
    job = ray_settings(job, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker)
    summary = train_on_ray(job, address=check_address(args.address), resume=args.resume)
    print(json.dumps(summary, indent=2))


def _submit(args: argparse.Namespace) -> None:
    """Submit ``facekd train JOB --ray`` as a Ray Job; with ``--follow`` stream its logs to its end."""
    from facekd.config import load_job
    from facekd.distributed.ray_jobs import dashboard_link
    from facekd.ray_train import ray_settings, submit_to_ray

    job = load_job(args.job, args.set)
    if _is_landmark_job(job):
        raise ConfigError(f"{args.job} is a landmark job (task: landmarks), which trains in one process: run it with "
                          f"facekd train, not on a Ray cluster")
    job = ray_settings(job, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker)  # checked here, before anything is sent
    flags = {"--workers": args.workers, "--cpus-per-worker": args.cpus_per_worker,
             "--gpus-per-worker": args.gpus_per_worker}
    train_args = [part for flag, value in flags.items() if value is not None for part in (flag, str(value))]
    train_args += ["--resume"] * args.resume + [part for item in args.set for part in ("--set", item)]
    client, job_id = submit_to_ray(args.job, job, address=args.address, train_args=train_args)
    print(f"submitted {job.name} as Ray job {job_id}")
    print(f"dashboard: {dashboard_link(client, job_id)}")
    if args.follow:
        _follow(client, job_id)
    else:
        print(f"follow it with: facekd jobs logs {job_id} --follow")


def _follow(client, job_id: str) -> None:
    """Stream a job's logs to its end; a job that did not succeed is an error (exit status 2)."""
    from facekd.distributed.ray_jobs import describe, follow

    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        # only the following stops: the job runs on in the cluster
        print(f"\nstopped following; job {job_id} goes on (facekd jobs logs {job_id} --follow, facekd jobs stop "
              f"{job_id})", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        message = describe(client, job_id)["message"] or ""
        raise TrainingError(f"Ray job {job_id} ended {status}: {message}")


def _jobs(args: argparse.Namespace) -> None:
    from facekd.distributed.ray_jobs import connect, describe, list_jobs

    client = connect(args.address)
    if args.jobs_command == "list":
        rows = list_jobs(client)
        for row in rows:
            print(f"{row['id']}  {row['status']:<9}  {row['start_time'] or '-':<19}  {row['entrypoint']}")
        if not rows:
            print("no jobs")
    elif args.jobs_command == "status":
        row = describe(client, args.id)
        print(f"{row['id']}: {row['status']}" + (f" ({row['message']})" if row["message"] else ""))
    elif args.jobs_command == "logs":
        describe(client, args.id)  # an unknown id is an error, not an empty log
        if args.follow:
            _follow(client, args.id)
        else:
            print(client.get_job_logs(args.id), end="")
    else:
        stopped = client.stop_job(args.id)
        print(f"{args.id}: {'stop requested' if stopped else 'already ended'}")


def _launch_local(args: argparse.Namespace) -> None:
    """``--nproc-per-node N``: the same command under torchrun on this machine (a free port on loopback)."""
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
               "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "facekd"]
    command += ["--debug"] * args.debug + ["--verbose"] * args.verbose + ["train", str(args.job)]
    command += ["--resume"] * args.resume + [part for item in args.set for part in ("--set", item)]
    returncode = subprocess.call(command)
    if returncode != 0:
        raise TrainingError(f"{args.nproc_per_node} ranks of {args.job} ended with exit status {returncode} "
                            "(each rank's error is printed above)")


def _eval_ijb(args: argparse.Namespace, root: Path) -> None:
    from facekd.evaluation.ijb_protocol import IJB_NAMES, evaluate_ijb, format_ijb_1n_table, format_ijb_table

    name = args.ijb_name or root.resolve().name.upper()
    if name not in IJB_NAMES:
        raise ConfigError(f"--ijb {root}: cannot tell IJB-B from IJB-C by the folder name; "
                          f"give --ijb-name {'|'.join(IJB_NAMES)}")
    rows = evaluate_ijb(args.checkpoints, root, name=name, out_dir=args.out, cache_dir=args.cache,
                        skip_missing=args.ijb_skip_missing, device=args.device, batch_size=args.batch_size)
    print(format_ijb_table(rows))
    if "identification" in rows[0]:
        print(format_ijb_1n_table(rows))
    skipped = rows[0]["skipped"]
    if skipped["images"]:
        print(f"skipped {skipped['images']} images without landmarks or files; {skipped['templates']} templates "
              f"and {skipped['pairs']} pairs left without images")
    print(f"{name}.json, {name}.md and roc_{name}.png written under {args.out}")


def _eval(args: argparse.Namespace) -> None:
    suite = [args.bins is not None, bool(args.ijb), args.megaface is not None]
    if args.bin is None and not any(suite):
        raise ConfigError("give --bin FILE..., or any of --bins DIR, --ijb ROOT..., --megaface ROOT")
    if args.bin is not None and any(suite):
        raise ConfigError("--bin scores single files on its own; for several benchmarks at once use --bins DIR "
                          "with --ijb and --megaface")
    if not args.ijb and (args.ijb_name is not None or args.ijb_skip_missing):
        raise ConfigError("--ijb-name and --ijb-skip-missing go with --ijb ROOT")
    if args.ijb_name is not None and len(args.ijb) > 1:
        raise ConfigError(f"--ijb-name names one benchmark, but --ijb gives {len(args.ijb)} folders: name each "
                          "folder IJBB or IJBC instead")
    if args.bin is not None:
        from facekd.eval import evaluate_checkpoints, format_table

        rows = evaluate_checkpoints(args.checkpoints, args.bin, out_dir=args.out, device=args.device,
                                    batch_size=args.batch_size)
        print(format_table(rows))
        print(f"results and ROC plot written under {args.out}")
        return
    # one benchmark after another, sharing --out and the embedding cache; their files do not collide
    if args.bins is not None:
        from facekd.evaluation.suite import evaluate_suite, find_bins, format_suite_table

        rows = evaluate_suite(args.checkpoints, find_bins(args.bins), out_dir=args.out, cache_dir=args.cache,
                              device=args.device, batch_size=args.batch_size)
        print(format_suite_table(rows))
        print(f"results.json, table.md and roc_<set>.png written under {args.out}")
    for root in args.ijb or ():
        _eval_ijb(args, root)
    if args.megaface is not None:
        from facekd.evaluation.identification import evaluate_identification, format_identification_table

        rows = evaluate_identification(args.checkpoints, args.megaface, out_dir=args.out, cache_dir=args.cache,
                                       device=args.device, batch_size=args.batch_size)
        print(format_identification_table(rows))
        print(f"identification.json, identification.md and cmc.png written under {args.out}")


def _import_insightface(args: argparse.Namespace) -> None:
    from facekd.models.insightface import import_insightface

    checkpoint = import_insightface(args.backbone, args.arch, args.out, name=args.name)
    print(f"{args.backbone} ({args.arch}, inputs normalised as (x − 127.5)/127.5) imported as {checkpoint}; "
          f"give it class centres with: facekd centres {args.out} --data MANIFEST")


def _centres(args: argparse.Namespace) -> None:
    from facekd.centres import compute_centres
    from facekd.distributed.world import launched_by_a_launcher

    checkpoint = compute_centres(args.run, args.data, out=args.out, batch_size=args.batch_size,
                                 num_workers=args.workers, save_every=args.save_every, device=args.device)
    if checkpoint is not None:
        print(f"class centres of {args.data} written as the head of {checkpoint}")
    if launched_by_a_launcher():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _export(args: argparse.Namespace) -> None:
    from facekd.export import export_onnx, export_torchscript

    if args.onnx is None and args.torchscript is None:
        raise ConfigError("give --onnx OUT.onnx, --torchscript OUT.pt or both")
    if args.onnx is not None:
        result = export_onnx(args.run, args.onnx, opset=args.opset, dynamic_batch=args.dynamic_batch)
        print(f"{result['path']}: input {result['input']} float32 RGB pixels 0-255 (normalisation "
              f"{result['normalize']} inside the graph), output {result['output']}; onnxruntime vs torch max abs "
              f"difference {result['max_abs_diff']:.2e}")
    if args.torchscript is not None:
        result = export_torchscript(args.run, args.torchscript)
        print(f"{result['path']}: TorchScript, same input and output; max abs difference {result['max_abs_diff']:.2e}")


def _analyze_routing(args: argparse.Namespace) -> None:
    from facekd.analyze import analyze_routing

    report = analyze_routing(args.run, args.data, args.attributes, clusters=args.clusters, method=args.method,
                             embed=args.embed, out=args.out, max_images=args.max_images, device=args.device)
    out = args.out if args.out is not None else Path(args.run) / "analysis" / "routing"
    print(f"{report['images']} images, {report['clusters']} clusters ({report['method']}); purity / AMI (random):")
    for name, row in report["scores"].items():
        print(f"  {name:12s} {row['purity']:.3f} / {row['ami']:.3f}   ({row['random_purity']:.3f} / "
              f"{row['random_ami']:.3f})")
    print(f"report and plots in {out}")


def _demo(args: argparse.Namespace) -> None:
    from facekd.demo import run_demo

    run_demo(args.out, device=args.device, fresh=args.fresh)


def _report(args: argparse.Namespace) -> None:
    from facekd.report import build_report

    path = build_report(args.runs, out=args.out, eval_dirs=args.eval or (), bench=args.bench)
    print(f"report written to {path}")


def _bench(args: argparse.Namespace) -> None:
    from facekd.bench import data, dgconv, gkd, gpu_suite, identification, margin, partial_fc

    modules = {"margin": [margin], "gkd": [gkd], "kernels": [margin, gkd], "data": [data],
               "gpu-suite": [gpu_suite], "partial-fc": [partial_fc], "dgconv": [dgconv],
               "identification": [identification]}[args.bench]
    for module in modules:
        parser = argparse.ArgumentParser(prog=f"facekd bench {module.__name__.rsplit('.', 1)[-1].replace('_', '-')}")
        module.add_arguments(parser)
        written = module.run(parser.parse_args(args.options))
        for kind, path in written.items():
            print(f"{kind}: {path}")


def _positive_int(text: str) -> int:
    """argparse type of counts and sizes: a plain integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    """argparse type of resource amounts: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _ray_resource_flags(group: argparse._ArgumentGroup) -> None:
    """--workers, --cpus-per-worker, --gpus-per-worker: shared by 'train --ray' and 'submit'."""
    group.add_argument("--workers", type=_positive_int, default=None, metavar="N", help="Ray Train workers (ranks)")
    group.add_argument("--cpus-per-worker", type=_positive_float, default=None, metavar="K",
                       help="CPUs reserved for each worker")
    group.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                       help="GPUs reserved for each worker (0: train on CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facekd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error caused by input or environment, not just its message")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make, convert and check data sets").add_subparsers(
        dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic identities as RecordIO, image folder and .bin pairs")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--identities", type=_positive_int, default=300, help="training identities (default 300)")
    synth.add_argument("--images-per-identity", type=_positive_int, default=20, help="images of each (default 20)")
    synth.add_argument("--val-identities", type=_positive_int, default=100,
                       help="identities of the verification pairs, disjoint from training (default 100)")
    synth.add_argument("--pairs", type=_positive_int, default=600, help="pairs in each .bin, half positive (default 600)")
    synth.add_argument("--image-size", type=_positive_int, default=112, help="side of the square images (default 112)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic set in --out")
    synth.set_defaults(handler=_data_synth)

    landmarks = data.add_parser("synth-landmarks", help="write synthetic faces with 5 and 68 landmarks as shards "
                                                        "(a training split and a held-out split of unseen identities)")
    landmarks.add_argument("--out", type=Path, required=True, help="output folder")
    landmarks.add_argument("--identities", type=_positive_int, default=200, help="training identities (default 200)")
    landmarks.add_argument("--images-per-identity", type=_positive_int, default=10, help="images of each (default 10)")
    landmarks.add_argument("--val-identities", type=_positive_int, default=40,
                           help="held-out identities, disjoint from training (default 40)")
    landmarks.add_argument("--val-images-per-identity", type=_positive_int, default=5,
                           help="images of each held-out identity (default 5)")
    landmarks.add_argument("--image-size", type=_positive_int, default=128, help="side of the images (default 128)")
    landmarks.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    landmarks.add_argument("--seed", type=int, default=0)
    landmarks.add_argument("--overwrite", action="store_true", help="replace an earlier landmark set in --out")
    landmarks.set_defaults(handler=_data_synth_landmarks)

    convert = data.add_parser("convert", help="RecordIO (.rec/.idx) or image folder → WebDataset shards (resumable)")
    convert.add_argument("source", type=Path, help="train.rec, a folder holding it, or root/<identity>/*.jpg")
    convert.add_argument("out", type=Path, help="shard folder (a manifest.json is written beside the shards)")
    convert.add_argument("--shard-size", type=_positive_int, default=10000, help="samples per shard (default 10000)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    convert.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    convert.add_argument("--workers", type=int, default=0, help="processes writing shards (default 0: this one)")
    convert.set_defaults(handler=_data_convert)

    inspect = data.add_parser("inspect", help="summarise and check shards, a .rec, an image folder or a .bin")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--quick", action="store_true", help="skip hashing shards against their sha256 digests")
    inspect.set_defaults(handler=_data_inspect)

    train = commands.add_parser("train", help="train a teacher or distil a student from a YAML job spec")
    train.add_argument("job", type=Path, help="job spec (see jobs/; task: landmarks trains a FAN)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a key of the spec (repeatable), e.g. --set train.steps=100")
    train.add_argument("--nproc-per-node", type=_positive_int, default=None, metavar="N",
                       help="run N ranks on this machine (torchrun); for several machines use torchrun itself: "
                            "torchrun --nnodes M --nproc-per-node N -m facekd train JOB.yaml")
    ray = train.add_argument_group("Ray cluster", "run the ranks as Ray Train workers (see README 'Ray cluster'); "
                                                  "these flags override the spec's ray section")
    ray.add_argument("--ray", action="store_true", help="train with Ray Train instead of in this process")
    ray.add_argument("--address", default=None,
                     help="cluster to join: auto, or ray://HOST:10001 (default: RAY_ADDRESS, else a Ray started here)")
    _ray_resource_flags(ray)
    train.set_defaults(handler=_train)

    submit = commands.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs), optionally follow it")
    submit.add_argument("job", type=Path, help="job spec (see jobs/); its paths must be valid on the cluster")
    submit.add_argument("--address", default=None,
                        help="the head's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 0 only when it SUCCEEDED")
    submit.add_argument("--resume", action="store_true",
                        help="continue from checkpoints in train.output_dir that Ray's storage does not know")
    submit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of the spec (repeatable)")
    _ray_resource_flags(submit)
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser("jobs", help="the Ray jobs of a cluster: list, status, logs, stop (as 'ray job')")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, what in (("list", "every job"), ("status", "a job's status"), ("logs", "a job's logs"),
                       ("stop", "stop a job")):
        command = jobs_commands.add_parser(name, help=what)
        if name != "list":
            command.add_argument("id", help="the job id 'facekd submit' printed")
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="stream until the job ends")
        command.add_argument("--address", default=None, help="http://HEAD:8265 (default: RAY_ADDRESS)")
        command.set_defaults(handler=_jobs)

    evaluate = commands.add_parser("eval", help="10-fold verification accuracy and ROC of trained networks")
    evaluate.add_argument("checkpoints", type=Path, nargs="+", help="checkpoints or run folders")
    sets = evaluate.add_argument_group("benchmarks", "--bin alone, or any of --bins, --ijb and --megaface together")
    sets.add_argument("--bin", type=Path, nargs="+", help="verification .bin files")
    sets.add_argument("--bins", type=Path, metavar="DIR",
                      help="every .bin in DIR (lfw, cfp_fp, agedb_30, ...): one table, networks as rows")
    sets.add_argument("--ijb", type=Path, nargs="+", metavar="ROOT",
                      help="IJB-B/C verification (and 1:N where its files are), insightface's layout: "
                           "ROOT/meta/ijbX_*.txt, ROOT/loose_crop/; the folder's name (IJBB, IJBC) says which")
    sets.add_argument("--megaface", type=Path, metavar="ROOT",
                      help="identification, MegaFace style: ROOT/probes/<identity>/, ROOT/gallery/<identity>/ and "
                           "ROOT/distractors/ of aligned images; rank-1, TAR@FAR=1e-6, CMC")
    evaluate.add_argument("--ijb-name", choices=("IJBB", "IJBC"), default=None,
                          help="--ijb: which benchmark (default: ROOT's folder name)")
    evaluate.add_argument("--ijb-skip-missing", action="store_true",
                          help="--ijb: drop images without landmarks or files (counted and reported) instead of "
                               "stopping at the first")
    evaluate.add_argument("--out", type=Path, default=Path("eval_out"), help="folder for results.json and roc.png")
    evaluate.add_argument("--cache", type=Path, default=None, metavar="DIR",
                          help="--bins/--ijb/--megaface: embedding cache (default OUT/embeddings)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--batch-size", type=_positive_int, default=128)
    evaluate.set_defaults(handler=_eval)

    importer = commands.add_parser("import", help="bring in a model from another toolkit as a facekd run folder")
    sources = importer.add_subparsers(dest="source", required=True, metavar="SOURCE")
    insightface = sources.add_parser("insightface", help="an insightface arcface_torch backbone.pth (model zoo)")
    insightface.add_argument("backbone", type=Path, help="backbone.pth: a state dict (bare, {'state_dict': ...} or "
                                                          "DDP 'module.'-prefixed)")
    insightface.add_argument("--arch", required=True, choices=("r18", "r34", "r50", "r100", "r200", "mbf"),
                             help="arcface_torch's network name (config.network)")
    insightface.add_argument("--out", type=Path, required=True, help="new run folder")
    insightface.add_argument("--name", default=None, help="name of the run (default insightface-ARCH)")
    insightface.set_defaults(handler=_import_insightface)

    centres = commands.add_parser("centres", help="class centres of a teacher on your shards, stored as its head "
                                                  "(resumable; several ranks under torchrun)")
    centres.add_argument("run", type=Path, help="run folder or checkpoint of the teacher")
    centres.add_argument("--data", type=Path, required=True, help="manifest.json (or its folder) of the shards")
    centres.add_argument("--out", type=Path, default=None,
                         help="run folder for the checkpoint with the centres (default: RUN itself)")
    centres.add_argument("--batch-size", type=_positive_int, default=64)
    centres.add_argument("--workers", type=int, choices=(0, 1), default=1,
                         help="1: decode in a loader process beside the forward; 0: in this one")
    centres.add_argument("--save-every", type=_positive_int, default=100,
                         help="batches between progress files (a rerun continues from the last)")
    centres.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    centres.set_defaults(handler=_centres)

    export = commands.add_parser("export", help="the backbone as ONNX (insightface's layout) and/or TorchScript")
    export.add_argument("run", type=Path, help="run folder or checkpoint")
    export.add_argument("--onnx", type=Path, default=None, help="OUT.onnx")
    export.add_argument("--opset", type=_positive_int, default=17)
    export.add_argument("--dynamic-batch", action="store_true", help="batch dimension free (default: 1)")
    export.add_argument("--torchscript", type=Path, default=None, help="OUT.pt (torch.jit.trace)")
    export.set_defaults(handler=_export)

    analyze = commands.add_parser("analyze", help="analyse a trained network").add_subparsers(
        dest="analysis", required=True, metavar="ANALYSIS")
    routing = analyze.add_parser("routing", help="cluster a routed network's routing vectors; purity and AMI "
                                                 "against attribute labels, PCA/t-SNE plots (CondFace)")
    routing.add_argument("run", type=Path, help="run folder or checkpoint of a routed backbone")
    routing.add_argument("--data", type=Path, required=True, help="shards: manifest.json or its folder")
    routing.add_argument("--attributes", type=Path, required=True,
                         help="CSV with an image_sha1 column (attributes.csv of 'facekd data synth')")
    routing.add_argument("--clusters", type=_positive_int, default=300,
                         help="k-means clusters (default 300, the thesis'; capped by the number of images)")
    routing.add_argument("--method", choices=("kmeans", "prototypes"), default="kmeans",
                         help="kmeans of the routing vectors, or the run's trained prototypes (a cluster: run)")
    routing.add_argument("--embed", choices=("pca", "tsne"), default="pca", help="2-D embedding of the plots")
    routing.add_argument("--out", type=Path, default=None, help="output folder (default RUN/analysis/routing)")
    routing.add_argument("--max-images", type=_positive_int, default=None, help="use at most this many images")
    routing.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    routing.set_defaults(handler=_analyze_routing)

    demo = commands.add_parser("demo", help="synthetic identities → shards → teacher → KD/GKD students → table")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder (default demo_out/)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--fresh", action="store_true", help="delete earlier demo output first instead of reusing it")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser("report", help="one self-contained HTML page: job specs, training curves, "
                                                "evaluation tables and plots of runs, side by side, and benchmarks")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders (train.output_dir)")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file (default report.html)")
    report.add_argument("--eval", type=Path, nargs="+", metavar="DIR",
                        help="folders written by 'facekd eval --out' to include as well")
    report.add_argument("--bench", type=Path, default=None, metavar="RESULTS",
                        help="results root of 'facekd bench' (results/<device>/*.json|md|png) to include")
    report.set_defaults(handler=_report)

    bench = commands.add_parser("bench", help="kernel benchmarks writing JSON, markdown and PNG under results/")
    bench.add_argument("bench", choices=("kernels", "margin", "gkd", "data", "gpu-suite", "partial-fc", "dgconv",
                                         "identification"),
                       help="margin: fused margin-softmax CE; gkd: grouped KD; kernels: both; data: the loader's "
                            "images/s per core against JPEG decode alone; gpu-suite: everything that needs a GPU in "
                            "one budgeted run (facekd/bench/GPU.md); partial-fc: a sharded classifier's samples/s and "
                            "per-rank memory against its accounting (facekd/bench/PARTIAL_FC.md); dgconv: the dynamic "
                            "group convolution against the aggregate-then-grouped-conv baseline; identification: "
                            "probes against a gallery plus up to 1M memory-mapped distractors, seconds and memory")
    bench.add_argument("options", nargs=argparse.REMAINDER,
                       help="options of the benchmark (see 'facekd bench margin -- --help')")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # ranks other than 0 report only problems
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.handler(args)
    except (FacekdError, OSError) as error:
        # problems of the user's input or environment: one line; anything else is a bug and keeps its traceback
        if args.debug:
            raise
        message = " ".join(str(error).split())
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = "" if rank is None else f"rank {rank}: "
        print(f"facekd: error: {where}{message}", file=sys.stderr)
        return 2
    return 0
