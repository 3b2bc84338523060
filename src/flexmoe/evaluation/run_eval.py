"""`flexmoe evaluate`: knowledge retention, routing and inference cost of a finished run.

`flexmoe run` scores every client's model with ROUGE on its own test split. The paper's other
claims need more, all added to the run's `results.json` next to what is already there:
- under each method M, `retention`: MMLU accuracy and held-out perplexity of every client's model
  (what fine-tuning did to the base model's knowledge), with the base model's values beside them;
- under each method M, `routing`: per client, the routing statistics of its model on its own test
  prompts, with the Jensen-Shannon divergence of every layer's load from the base model's load on
  the same prompts (routing drift), and FLEx's gate means;
- at top level, `base` (the base model's MMLU, perplexity and per-client routing) and `cost`
  (active parameters, FLOPs and measured latency of each grafting method's model against the same
  model without its graft).
This is the drift of the final models; drift after every round is measured by the clients
themselves during training, on a few of their test prompts (`flexmoe.federated.drift`), since a
run keeps only the final shared parameters and earlier rounds' models cannot be rebuilt.

Methods whose clients all hold the same model (the "MoE + X" baselines, fedit) are scored once;
models that differ per client (FLEx's grafts, `local`) are scored client by client. Every model
sees the same MMLU items and the same held-out tokens, so per-client numbers pair up across
methods and seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from flexmoe.data import MMLUItem, encode_prompt, load_mmlu
from flexmoe.evaluation.cost import inference_cost
from flexmoe.evaluation.generation import generate_responses
from flexmoe.evaluation.mmlu import SHOT_SPLIT, balanced_subset, score_mmlu
from flexmoe.evaluation.perplexity import heldout_perplexity
from flexmoe.evaluation.rouge import ROUGE_TYPES, rouge_f1
from flexmoe.evaluation.routing import (
    RoutingProfile,
    prompt_batches,
    routing_profile,
    routing_summary,
)
from flexmoe.federated import task
from flexmoe.federated.artifacts import RunArtifacts
from flexmoe.federated.config import EVAL_METRICS, RunConfig
from flexmoe.federated.methods import METHODS
from flexmoe.models.loading import LoadedModel, load_model
from flexmoe.runtime import console

RESULTS_FILE = "results.json"
DRIFT_NOTE = (
    "`flexmoe evaluate` measures the routing drift of the final models (JS divergence of each "
    "layer's load from the base model's on the same test prompts); drift after every round is "
    "measured by the clients during training, on their first eval.drift_samples test prompts "
    "(routing_js in each method's rounds.jsonl)"
)


class EvaluationError(ValueError):
    """A run that cannot be evaluated as asked; the message says what to do instead."""


@dataclass
class EvalSettings:
    """How much of each metric to compute. Defaults suit the built-in model (256-token context)
    on a CPU: about 10 s per model (MMLU 6 s, perplexity 3 s on one thread), so about two minutes
    for a run of flex, fedavg, fedavgm and local on 4 clients (11 distinct models)."""

    mmlu_per_subject: int | None = 4
    """Questions per MMLU subject (a subject-balanced subset, 57 subjects); None: all 14,042."""
    mmlu_k_shot: int = 1
    """Worked examples per prompt: small, since shots must fit the model's context."""
    mmlu_subjects: tuple[str, ...] = ()
    """Only these subjects (empty: all)."""
    mmlu_split: str = "test"
    """test, or redux (MMLU-Redux)."""
    mmlu_seed: int = 0
    """Draws the balanced subset: fixed, so every model answers the same questions."""
    mmlu_max_length: int = 1024
    """Prompt tokens (capped at the model's maximum positions; earliest shots dropped first)."""
    ppl_max_tokens: int = 16_384
    """Held-out (WikiText-2 test) tokens scored for perplexity."""
    ppl_seq_len: int | None = None
    """Window length for perplexity (default: the model's maximum positions, at most 1024)."""
    routing_samples: int | None = None
    """Test prompts per client for routing statistics (default: the run's `eval.samples`)."""
    cost_prompts: int = 4
    """Prompts generated at once when timing the grafted model against the un-grafted one."""
    cost_new_tokens: int = 16
    cost_repeats: int = 3
    batch_size: int = 8

    def for_metric(self, metric: str) -> dict:
        """The settings a metric's numbers depend on (recorded beside them)."""
        prefix = {"mmlu": "mmlu_", "ppl": "ppl_", "routing": "routing_", "cost": "cost_"}
        if metric not in prefix:
            return {}
        chosen = {k: v for k, v in asdict(self).items() if k.startswith(prefix[metric])}
        return json.loads(json.dumps(chosen))  # as stored in results.json (tuples as lists)


def evaluate_run(
    run_dir: str | Path,
    metrics: Sequence[str] = EVAL_METRICS,
    settings: EvalSettings | None = None,
    *,
    methods: Sequence[str] | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Add `metrics` of every client's model (and the base model's) to RUN_DIR/results.json.

    `methods` limits the evaluation to some of the run's methods (default: all finished ones);
    what earlier evaluations wrote for other metrics and methods is kept. Returns the updated
    results, also written to disk after each method (an interrupted evaluation keeps its work).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    settings = settings or EvalSettings()
    metrics = _checked_metrics(metrics)
    artifacts = RunArtifacts(run_dir, state_dir=state_dir)
    results = _read_results(run_dir)
    chosen = _checked_methods(artifacts, results, methods)
    record = results.setdefault("evaluation", {"settings": {}, "notes": []})
    _check_consistent_settings(record, results, metrics, settings, chosen)
    evaluator = _Evaluator(artifacts, settings, progress)

    if {"mmlu", "ppl", "routing"} & set(metrics):
        console.log("evaluating the base model")
        results["base"] = {**results.get("base", {}), **evaluator.evaluate_base(metrics)}
    for method in chosen:
        console.log(f"evaluating {method}")
        evaluator.evaluate_method(method, results["methods"][method], metrics)
        _save_results(run_dir, results)
    if "cost" in metrics:
        grafting = [m for m in chosen if METHODS[m].graft]
        cost = results.setdefault("cost", {})
        for method in grafting:
            cost[method] = evaluator.cost(method)
        if not grafting:
            _add_note(record, "cost: no evaluated method grafts an expert; nothing to compare")
    for metric in metrics:
        record["settings"][metric] = settings.for_metric(metric)
    if "routing" in metrics:
        _add_note(record, DRIFT_NOTE)
    record["seconds"] = time.perf_counter() - started
    _save_results(run_dir, results)
    return results


def evaluate_configured(cfg: RunConfig, run_dir: str | Path) -> None:
    """After a run: the metrics beyond ROUGE that its configuration asks for (`eval.metrics`),
    unless an earlier evaluation of the run measured them already."""
    done = _read_results(Path(run_dir)).get("evaluation", {}).get("settings", {})
    extra = [metric for metric in cfg.eval.metrics if metric != "rouge" and metric not in done]
    if extra:
        evaluate_run(run_dir, extra)


class _Evaluator:
    """Scores models of one run; holds what every model shares (MMLU items, client prompts)."""

    def __init__(self, artifacts: RunArtifacts, settings: EvalSettings, progress: bool) -> None:
        self.artifacts, self.settings, self.progress = artifacts, settings, progress
        self.clients = artifacts.clients
        self.base_profiles: dict[int, RoutingProfile] = {}
        self.base_headlines: dict[str, dict] = {}
        self._mmlu: tuple[list[MMLUItem], list[MMLUItem]] | None = None
        self._mmlu_scored = False
        self._prompts: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------ per model set

    def evaluate_base(self, metrics: Sequence[str]) -> dict:
        """The base model's scores, kept as the reference every method is compared with."""
        cfg = self.artifacts.config
        loaded = load_model(task.model_source(cfg), dtype=cfg.dtype, device=cfg.device)
        base = self.knowledge(loaded, metrics)
        self.base_headlines = {key: _headline(key, value) for key, value in base.items()}
        if "routing" in metrics:
            self.base_profiles = {c.id: self.profile(loaded, c.id) for c in self.clients}
            base["routing"] = _routing_block(
                {cid: _client_routing(p, None) for cid, p in self.base_profiles.items()}
            )
        return base

    def evaluate_method(self, method: str, entry: dict, metrics: Sequence[str]) -> None:
        """Fill `entry` (the method's block of results.json) with the requested metrics."""
        if "rouge" in metrics:
            self.fill_missing_rouge(method, entry)
        wanted = {"mmlu", "ppl", "routing"} & set(metrics)
        if not wanted:
            return
        m = METHODS[method]
        per_client = m.graft or not m.aggregates
        knowledge: dict[int, dict] = {}
        routing: dict[int, dict] = {}
        shared = None if per_client else self.artifacts.global_model(method)
        if shared is not None:
            scores = self.knowledge(shared, metrics)
        for client in self.clients:
            loaded = self.artifacts.client_model(method, client.id) if per_client else shared
            if per_client:
                scores = self.knowledge(loaded, metrics)
            knowledge[client.id] = scores
            if "routing" in metrics:
                profile = self.profile(loaded, client.id)
                routing[client.id] = _client_routing(profile, self.base_profiles[client.id])
            if per_client:
                del loaded
        retention = entry.setdefault("retention", {})
        for metric, key in (("mmlu", "mmlu"), ("ppl", "perplexity")):
            if metric in metrics:
                retention[key] = _retention_block(
                    key,
                    {cid: scores[key] for cid, scores in knowledge.items()},
                    base=self.base_headlines[key],
                    same_model=not per_client,
                )
        if "routing" in metrics:
            entry["routing"] = _routing_block(routing)

    def fill_missing_rouge(self, method: str, entry: dict) -> None:
        """Score clients whose ROUGE the run could not record (e.g. a failed evaluation)."""
        cfg = self.artifacts.config
        missing = [c for c in self.clients if "rougeL" not in entry["clients"].get(str(c.id), {})]
        for client in missing:
            loaded = self.artifacts.client_model(method, client.id)
            records = self.artifacts.client_data(client.id).test[: cfg.eval.samples]
            predictions = generate_responses(
                loaded.model,
                loaded.tokenizer,
                records,
                max_new_tokens=cfg.eval.max_new_tokens,
                max_prompt_length=cfg.prompt_length,
                batch_size=cfg.eval.batch_size,
            )
            scores = rouge_f1(predictions, [r.response for r in records])
            entry["clients"][str(client.id)] = {
                "name": client.name,
                **scores,
                "num-examples": len(records),
            }
            del loaded
        if missing:
            scored = [c for c in entry["clients"].values() if "rougeL" in c]
            entry["average"] = {k: sum(c[k] for c in scored) / len(scored) for k in ROUGE_TYPES}
            console.log(f"{method}: ROUGE recomputed for {len(missing)} client(s)")

    # ------------------------------------------------------------ per model

    def knowledge(self, loaded: LoadedModel, metrics: Sequence[str]) -> dict:
        """{"mmlu": {...}, "perplexity": {...}} of one model, for the requested metrics."""
        s = self.settings
        scores = {}
        if "mmlu" in metrics:
            items, shots = self.mmlu_items()
            # Every model gets the same prompts: a truncation warning is worth printing once.
            with _console_quiet(self._mmlu_scored):
                result = score_mmlu(
                    loaded.model,
                    loaded.tokenizer,
                    items,
                    shots,
                    k_shot=s.mmlu_k_shot,
                    batch_size=s.batch_size,
                    max_length=s.mmlu_max_length,
                    split=s.mmlu_split,
                    progress=self.progress,
                )
            self._mmlu_scored = True
            scores["mmlu"] = {
                "accuracy": result.accuracy,
                "macro_accuracy": result.macro_accuracy,
                "per_category": result.per_category,
                "n": result.n,
                "k_shot": result.k_shot,
                "shots_dropped": result.shots_dropped,
            }
        if "ppl" in metrics:
            scores["perplexity"] = heldout_perplexity(
                loaded.model,
                loaded.tokenizer,
                max_tokens=s.ppl_max_tokens,
                seq_len=s.ppl_seq_len,
                batch_size=s.batch_size,
                progress=self.progress,
            )
        return scores

    def mmlu_items(self) -> tuple[list[MMLUItem], list[MMLUItem]]:
        """The evaluated questions and the few-shot examples, drawn once for every model."""
        if self._mmlu is None:
            s = self.settings
            subjects = list(s.mmlu_subjects) or None
            items = load_mmlu(s.mmlu_split, subjects)
            if s.mmlu_per_subject is not None:
                items = balanced_subset(items, s.mmlu_per_subject, s.mmlu_seed)
            shots = load_mmlu(SHOT_SPLIT, subjects) if s.mmlu_k_shot > 0 else []
            self._mmlu = (items, shots)
        return self._mmlu

    def profile(self, loaded: LoadedModel, client_id: int) -> RoutingProfile:
        """Routing of `loaded` on the client's test prompts (padding excluded)."""
        prompts = self.client_prompts(loaded, client_id)
        batches = prompt_batches(prompts, loaded.tokenizer, self.settings.batch_size)
        return routing_profile(loaded.model, batches, progress=self.progress)

    def client_prompts(self, loaded: LoadedModel, client_id: int) -> list[list[int]]:
        """Token ids of the client's test prompts, cut as at the run's evaluation."""
        if client_id not in self._prompts:
            cfg = self.artifacts.config
            samples = self.settings.routing_samples or cfg.eval.samples
            records = self.artifacts.client_data(client_id).test[:samples]
            if not records:
                raise EvaluationError(f"client {client_id} has no test items to route")
            self._prompts[client_id] = [
                encode_prompt(r, loaded.tokenizer, cfg.prompt_length) for r in records
            ]
        return self._prompts[client_id]

    def cost(self, method: str) -> dict:
        """Inference cost of the first client's grafted model against it without the graft."""
        s = self.settings
        client = self.clients[0]
        loaded = self.artifacts.client_model(method, client.id)
        prompts = [
            loaded.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in self.client_prompts(loaded, client.id)[: s.cost_prompts]
        ]
        measured = inference_cost(
            None,
            loaded.model,
            loaded.tokenizer,
            prompts,
            max_new_tokens=s.cost_new_tokens,
            repeats=s.cost_repeats,
            progress=self.progress,
        )
        return {"client": client.id, **measured}


# ---------------------------------------------------------------- result blocks


def _headline(key: str, value: dict) -> dict:
    """The numbers of a knowledge score that are averaged over clients."""
    names = ("accuracy", "macro_accuracy") if key == "mmlu" else ("perplexity", "bits_per_byte")
    return {name: value[name] for name in names}


def _retention_block(key: str, per_client: dict[int, dict], base: dict, same_model: bool) -> dict:
    """{"clients": {id: scores}, "mean": headline means, "base": the base model's headline}."""
    headlines = [_headline(key, scores) for scores in per_client.values()]
    return {
        "clients": {str(cid): scores for cid, scores in per_client.items()},
        "mean": {k: sum(h[k] for h in headlines) / len(headlines) for k in headlines[0]},
        "base": base,
        "same_model_for_all_clients": same_model,
    }


def _client_routing(profile: RoutingProfile, reference: RoutingProfile | None) -> dict:
    return {**routing_summary(profile, reference), "profile": profile.to_dict()}


def _routing_block(per_client: dict[int, dict]) -> dict:
    """Per-client routing summaries and the mean of their layer-means over clients."""
    means = [c["mean"] for c in per_client.values()]
    return {
        "clients": {str(cid): entry for cid, entry in per_client.items()},
        "mean": {k: sum(m[k] for m in means) / len(means) for k in means[0]},
    }


# ---------------------------------------------------------------- checks and files


def _checked_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown or not metrics:
        raise EvaluationError(
            f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(EVAL_METRICS)}"
        )
    return [m for m in EVAL_METRICS if m in metrics]


def _read_results(run_dir: Path) -> dict:
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise EvaluationError(
            f"{run_dir} has no {RESULTS_FILE}: the run has not finished; continue it with "
            f"`flexmoe run --resume {run_dir}`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _checked_methods(
    artifacts: RunArtifacts, results: dict, methods: Sequence[str] | None
) -> list[str]:
    available = [m for m in artifacts.methods if m in results["methods"]]
    if methods is None:
        return available
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise EvaluationError(
            f"method(s) {', '.join(unknown)} not among the finished methods of "
            f"{artifacts.run_dir}: {', '.join(available)}"
        )
    return [m for m in available if m in methods]


def _check_consistent_settings(
    record: dict, results: dict, metrics: Sequence[str], settings: EvalSettings, chosen: list[str]
) -> None:
    """Refuse to mix numbers of different settings: re-evaluating some methods of a metric with
    new settings would leave the others (and their pairing with the base model) stale."""
    skipped = set(results["methods"]) - set(chosen)
    for metric in metrics:
        before = record["settings"].get(metric)
        if skipped and before is not None and before != settings.for_metric(metric):
            raise EvaluationError(
                f"{metric} was evaluated before with other settings ({before}); evaluating only "
                f"{', '.join(chosen)} with {settings.for_metric(metric)} would mix the two: "
                "evaluate all methods (drop the method selection) or keep the earlier settings"
            )


@contextmanager
def _console_quiet(quiet: bool) -> Iterator[None]:
    """Silence flexmoe's console for a block when `quiet` (the user's --quiet always holds)."""
    before = console.quiet
    console.quiet = before or quiet
    try:
        yield
    finally:
        console.quiet = before


def _add_note(record: dict, note: str) -> None:
    if note not in record["notes"]:
        record["notes"].append(note)


def _save_results(run_dir: Path, results: dict) -> None:
    """Write results.json atomically (a reader never sees half a file)."""
    path = run_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
