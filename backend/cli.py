"""mllm-backend: serve the Label Studio ML backend, or build a tiny offline checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from backend.review_plan import FLOOR, SELECTION_RULES
from backend.settings import SERVER_SCORINGS, Settings, SettingsError
from backend.training import TRAINING_LOSSES

TINY_HELP = (
    "Write a tiny random-weight image-text-to-text checkpoint (model + processor, built offline) to DIR. "
    "It is for demos and tests on machines without a GPU or a model hub: MLLM_MODEL=DIR serves it, "
    "but its labels are random. For real labels use a real checkpoint, e.g. MLLM_MODEL=Qwen/Qwen2.5-VL-7B-Instruct."
)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"mllm-backend: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


RESERVED_THREADS = 4  # request threads no prediction can take: /health and /setup answer at once under any load


def serve(host: str, port: int, threads: int | None) -> None:
    """Run the app under gunicorn: one worker process (one copy of the model), several threads.

    At most MAX_PREDICTS_IN_FLIGHT threads predict (more requests get a fast 503), and
    RESERVED_THREADS more are always free, so Label Studio's 1 s /health never queues
    behind predictions.
    """
    from gunicorn.app.base import BaseApplication
    from gunicorn.workers.gthread import ThreadWorker

    from backend.server import create_app
    from backend.service import build_service

    settings = _load_settings()
    _configure_logging(settings.log_level)
    needed = settings.max_predicts_in_flight + RESERVED_THREADS
    if threads is not None and threads < needed:
        print(
            f"mllm-backend: --threads {threads} raised to {needed} (MAX_PREDICTS_IN_FLIGHT="
            f"{settings.max_predicts_in_flight} + {RESERVED_THREADS} kept for /health and /setup)",
            file=sys.stderr,
        )
    threads = max(threads or 0, needed)

    class _Worker(ThreadWorker):
        """Stops listening as soon as it starts stopping: a request then is refused, not left hanging."""

        def set_accept_enabled(self, enabled: bool) -> None:
            super().set_accept_enabled(enabled)
            if not enabled and not self.alive:
                for listener in self.sockets:
                    listener.close()

    class _Gunicorn(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", _Worker)
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 300)
            self.cfg.set("accesslog", "-")

        def load(self):  # in the worker, so the model loads after the fork
            try:
                return create_app(build_service(settings))
            except Exception as exc:
                print(f"mllm-backend: cannot start: {exc}", file=sys.stderr)
                raise

    _Gunicorn().run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mllm-backend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="start the ML backend (configured from the environment; see README)")
    run.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    threads_help = "request threads in the one worker (default and minimum: MAX_PREDICTS_IN_FLIGHT + 4)"
    run.add_argument("--threads", type=int, default=None, help=threads_help)

    tiny = commands.add_parser(
        "tiny-model", help="write a tiny random checkpoint for offline demos/tests", description=TINY_HELP
    )
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument(
        "--arch",
        choices=["llava", "idefics3", "vit"],
        default="llava",
        help="llava or idefics3: an MLLM for MLLM_MODEL; vit: an image backbone for CLASSIFIER_BACKBONE "
        "(default llava)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")

    bench = commands.add_parser(
        "bench", help="measure the engine (tiny checkpoint) and this backend against its peers (shapes model); JSON"
    )
    bench.add_argument("--out", type=Path, default=Path("bench-results/engine.json"), help="JSON file to write")
    bench.add_argument("--repeats", type=int, default=15, help="timed repeats per measurement (the fastest is kept)")
    bench.add_argument("--peer-tasks", type=int, default=40, help="shapes-world tasks for the peer comparison")

    plan = commands.add_parser(
        "review-plan",
        help="draw the tasks to review, with known probabilities (reads scores from Label Studio)",
        description="Reads the project's predictions from our current model_version through LABEL_STUDIO_URL / "
        "LABEL_STUDIO_API_KEY, draws a review sample (every task's inclusion probability is recorded in "
        "MODEL_DIR's review store) and prints the plan as JSON. Give --budget (expected fraction of tasks) or "
        "--target (expected fraction of wrong labels to catch).",
    )
    plan.add_argument("--project", type=int, required=True, help="Label Studio project id")
    amount = plan.add_mutually_exclusive_group(required=True)
    amount.add_argument("--budget", type=float, help="fraction of tasks you can review, e.g. 0.2")
    amount.add_argument("--target", type=float, help="fraction of expected errors to catch, e.g. 0.9")
    plan.add_argument("--rule", choices=SELECTION_RULES, default="threshold",
                      help="threshold: the most suspicious for sure, the rest at --floor (default); "
                      "exponential: a probability rising smoothly with suspicion")  # fmt: skip
    plan.add_argument(
        "--floor",
        type=float,
        default=FLOOR,
        help=f"every task's least chance of review, so estimates stay unbiased (default {FLOOR})",
    )
    plan.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    plan.add_argument(
        "--create-view",
        action="store_true",
        help='also save the Data Manager tabs "Review sample" and "Most suspicious first"',
    )
    estimate = commands.add_parser(
        "review-estimate",
        help="the project's label accuracy estimated from its reviewed sample, with a confidence interval",
        description="Reads MODEL_DIR's review store: the latest review plan's drawn tasks whose reviews arrived "
        "through the webhook, weighted by 1/their inclusion probability. Prints JSON.",
    )
    estimate.add_argument("--project", type=int, required=True, help="Label Studio project id")
    estimate.add_argument("--confidence", type=float, default=0.95, help="of the interval (default 0.95)")

    demo = commands.add_parser(
        "demo",
        help="offline demo: a local Label Studio with a sample project labelled by this backend",
        description="Starts Label Studio 1.23.2 (installed into its own virtualenv on first use) and the backend, "
        "creates a demo project from the shapes world with the boxes a person drew, retrieves predictions, saves "
        "the tab 'Most suspicious first', and runs until Ctrl-C. Without MLLM_MODEL it serves the shapes model.",
    )
    demo.add_argument("--workdir", type=Path, default=Path(".demo"), help="where Label Studio's data goes")
    demo.add_argument("--port", type=int, default=8080, help="Label Studio's port (default 8080)")
    demo.add_argument("--backend-port", type=int, default=9090, help="the backend's port (default 9090)")

    evaluation = commands.add_parser(
        "eval", help="our predictions against human annotations: report.json, summary.md and PNG plots"
    )
    source = evaluation.add_mutually_exclusive_group(required=True)
    source.add_argument("--project", type=int, help="a Label Studio project (through LABEL_STUDIO_URL/API_KEY)")
    source.add_argument("--tasks", type=Path, help="a JSON list of tasks with annotations and predictions inline")
    evaluation.add_argument("--label-config", type=Path, help="with --tasks: the project's label config")
    evaluation.add_argument("--model-version", help="whose predictions to judge (default: ours now)")
    evaluation.add_argument("--out", type=Path, default=Path("eval-report"), help="output folder")
    evaluation.add_argument("--gpu-hour-price", type=float, default=2.0, help="model cost per GPU hour (default 2.0)")
    evaluation.add_argument("--human-cost-per-label", type=float, default=0.025,
                            help="a person's cost per label (default 0.025: 6 s at 15/h)")  # fmt: skip
    evaluation.add_argument("--disagreement-tab", action="store_true",
                            help="with --project: save the Data Manager tab \"Model and person disagree\" listing "
                            "the tasks to annotate again")  # fmt: skip

    concepts = commands.add_parser(
        "concepts", help="concept calibration: the labels people correct most, with drafted definitions",
        description="Ranks the labels people corrected most (our predictions against their annotations) and what "
        "they chose instead, and drafts a definition for each with the configured model. Prints JSON; with "
        "--accept, writes the drafts into PROMPTS_DIR/concepts.json, which changes the model_version.",
    )  # fmt: skip
    concept_source = concepts.add_mutually_exclusive_group(required=True)
    concept_source.add_argument("--project", type=int, help="a Label Studio project (LABEL_STUDIO_URL/API_KEY)")
    concept_source.add_argument("--tasks", type=Path, help="a JSON list of tasks with annotations and predictions")
    concepts.add_argument("--label-config", type=Path, help="with --tasks: the project's label config")
    concepts.add_argument("--model-version", help="whose predictions to judge (default: ours now)")
    concepts.add_argument("--top", type=int, default=5, help="how many labels to draft definitions for (default 5)")
    concepts.add_argument("--accept", action="store_true", help="write the drafts into concepts.json")

    world = commands.add_parser(
        "world", help="write a synthetic shapes world with full ground truth (images, Label Studio files)",
        description="Scenes of coloured shapes with every answer known: images/, truth.json, and for each kind of "
        "project (boxes, boxes_fine, tags, boxes_and_tags, image_class, attributes) a config.xml and a Label "
        "Studio import file tasks.json with the ground truth as annotations. The same seed gives the same world.",
    )  # fmt: skip
    world.add_argument("dir", type=Path, help="output folder")
    world.add_argument("--tasks", type=int, default=200, help="how many scenes (default 200)")
    world.add_argument("--seed", type=int, default=1000, help="random seed (default 1000)")
    world.add_argument("--image-url-prefix", help="reference images as PREFIX + images/<name>.png instead of "
                       "embedding data: URLs (e.g. /data/local-files/?d=world/)")  # fmt: skip

    quality = commands.add_parser(
        "quality", help="measure label quality on a held-out shapes world: report.json, summary.md, plots",
        description="Generates a world from --seed, predicts it through the backend exactly as Label Studio calls "
        "it, simulates a reviewer through annotation webhooks, and compares everything with the ground truth.",
    )  # fmt: skip
    quality.add_argument("--out", type=Path, default=Path("quality-report"), help="output folder")
    quality.add_argument("--tasks", type=int, default=200, help="how many scenes (default 200)")
    quality.add_argument(
        "--seed", type=int, default=None, help="the world's seed (default 2500, never a training seed)"
    )
    quality.add_argument("--model", help="the model to judge (default: the shipped shapes model)")
    quality.add_argument("--base-url", help="ask an OpenAI-compatible server (its /v1 address, e.g. a vLLM serving "
                         "--model) instead of loading the model in process")  # fmt: skip
    quality.add_argument("--served-model", help="the server's name for the model (default: --model)")
    quality.add_argument("--vllm", action="store_true", help="start a local vLLM (CPU build, installed on first "
                         "use) serving --model for this run, and ask it (as --base-url would)")  # fmt: skip
    quality.add_argument("--scoring", choices=SERVER_SCORINGS, default="full-label",
                         help="with --base-url: OPENAI_SCORING (default full-label)")  # fmt: skip
    quality.add_argument("--boxes-only", action="store_true", help="stop after the box labels and their "
                         "suspicion figures (box accuracy, AUROCs): a quick check, e.g. of a server")  # fmt: skip

    shapes = commands.add_parser(
        "shapes-model", help="write the trained shapes model (a LLaVA-architecture checkpoint) to DIR",
        description="Copies the shipped checkpoint, trained on the shapes world; --train trains it again from its "
        "seeds (about 20 minutes on 2 CPU cores; `torch` draws differ across machines, so the figures match in range).",
    )  # fmt: skip
    shapes.add_argument("dir", type=Path, help="output folder")
    shapes.add_argument("--train", action="store_true", help="train from scratch instead of copying")
    shapes.add_argument("--steps", type=int, default=3500, help="with --train: question-answer steps (default 3500)")
    shapes.add_argument("--vision-steps", type=int, default=2500, help="with --train: vision steps (default 2500)")

    commands.add_parser("worker", help="run an rq worker for training and pre-annotation jobs (needs REDIS_URL)")
    train = commands.add_parser(
        "train",
        help="train the project's downstream classifier now, in the foreground (as a webhook-queued job would)",
        description="Exports the project's labels through LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, trains a "
        "classifier per control and commits a new version under MODEL_DIR; prints the version's metrics as JSON.",
    )
    train.add_argument("--project", type=int, required=True, help="Label Studio project id")
    train.add_argument("--loss", choices=TRAINING_LOSSES, help="the loss (default: TRAINING_LOSS, else weighted)")
    pre = commands.add_parser("preannotate", help="queue pre-annotation of a whole project (or some tasks)")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--tasks", type=int, nargs="*", help="only these task ids")

    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.host, args.port, args.threads)
    elif args.command == "tiny-model":
        from backend.devtools.tiny import build_tiny_checkpoint

        out = build_tiny_checkpoint(args.dir, args.arch, args.seed)
        print(f"wrote a tiny random {args.arch} checkpoint to {out} (random weights: its labels are random)")
        print(f"serve it with: MLLM_MODEL={out} mllm-backend serve")
    elif args.command == "eval":
        from backend.evaluation.report import Pricing, run_eval

        written = run_eval(_load_settings(), args.project, args.tasks, args.label_config, args.model_version,
                           args.out, Pricing(args.gpu_hour_price, args.human_cost_per_label),
                           args.disagreement_tab)  # fmt: skip
        print("\n".join(str(path) for path in written))
    elif args.command == "concepts":
        from backend.evaluation.report import run_concepts

        print(json.dumps(run_concepts(_load_settings(), args.project, args.tasks, args.label_config,
                                      args.model_version, top=args.top, accept=args.accept), indent=2))  # fmt: skip
    elif args.command == "world":
        from backend.shapes.world import WORLD_VERSION, write_world

        written = write_world(args.dir, tasks=args.tasks, seed=args.seed, image_url_prefix=args.image_url_prefix)
        print(f"wrote {len(written.scenes)} scenes of {WORLD_VERSION} (seed {args.seed}) to {written.root}")
        for kind, (config, tasks) in written.projects.items():
            print(f"  {kind}: {config} + {tasks}")
    elif args.command == "quality":
        from backend.evaluation.quality import REPORT_SEED, run_quality
        from backend.shapes.training import SHIPPED

        seed = REPORT_SEED if args.seed is None else args.seed
        model = args.model or str(SHIPPED)
        with _vllm_for(model, args.vllm) as started:
            report = run_quality(args.out, tasks=args.tasks, seed=seed, model=model,
                                 base_url=started or args.base_url, served_model=args.served_model or
                                 ("shapes" if started else None), scoring=args.scoring,
                                 boxes_only=args.boxes_only)  # fmt: skip
        print((args.out / "summary.md").read_text())
        print(f"box_accuracy {report['box_accuracy']:.3f}; wrote {args.out}")
    elif args.command == "shapes-model":
        from backend.shapes.training import train_shapes_model, write_shapes_model

        if args.train:
            print(train_shapes_model(args.dir, steps=args.steps, vision_steps=args.vision_steps))
        else:
            print(f"wrote the shipped shapes model to {write_shapes_model(args.dir)}")
    elif args.command == "worker":
        from backend.jobs import run_worker

        settings = _load_settings()
        _configure_logging(settings.log_level)
        run_worker(settings)
    elif args.command == "train":
        from dataclasses import replace

        from backend.training.run import train_project

        settings = _load_settings()
        _configure_logging(settings.log_level)
        chosen = replace(settings, training_loss=args.loss) if args.loss else settings
        print(json.dumps(train_project(chosen, args.project), indent=2))
    elif args.command == "preannotate":
        from backend.jobs import RedisJobs

        settings = _load_settings()
        if not settings.redis_url:
            print("mllm-backend preannotate queues work for `mllm-backend worker` and needs REDIS_URL; without Redis, "
                  'POST {"project": N} to the running backend\'s /jobs/preannotate', file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
        print(RedisJobs(settings).preannotate(args.project, args.tasks))
    elif args.command == "demo":
        from backend.devtools.devstack import run_demo

        run_demo(args.workdir, args.port, args.backend_port)
    elif args.command == "review-plan":
        from backend.review_plan import run_review_plan

        run_review_plan(_load_settings(), args.project, budget=args.budget, target=args.target, rule=args.rule,
                        floor=args.floor, seed=args.seed, create_view=args.create_view)  # fmt: skip
    elif args.command == "review-estimate":
        from backend.review_plan import run_review_estimate

        run_review_estimate(_load_settings(), args.project, args.confidence)
    elif args.command == "bench":
        from backend.bench import main as bench_main

        bench_main(args.out, args.repeats, args.peer_tasks)


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def _vllm_for(model: str, wanted: bool):
    """A vLLM serving ``model`` for the block (its /v1 URL), or None when not ``wanted``."""
    if not wanted:
        yield None
        return
    from backend.devtools.vllm import vllm_server

    with vllm_server(model) as url:
        yield url
