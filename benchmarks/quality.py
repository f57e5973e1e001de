"""Lens-finding quality judged on data the model never saw: own test split vs a shifted simulation.

Everything goes through the normal ``lensray`` commands (simulate, preprocess, train, evaluate), with fixed
seeds, so the figures can be reproduced with the same commands by hand:

1. ``lensray simulate --preset randomised`` -> the training set (train / val / test splits by ID);
   ``lensray simulate --preset shifted`` -> a second set drawn from deliberately different priors, used
   only for evaluation (README "Simulation priors").
2. ``lensray preprocess`` per label rule (``challenge``, ``paper``): central 10" binned 2x -> 4x50x50 on
   CPU, full 4x200x200 with ``--full``.
3. ``lensray train`` per network, rule and seed (``configs/<net>.yaml``, the project's default recipes).
4. ``lensray evaluate`` on the own test split and on the shifted set; per-kind AUC (all lenses against the
   non-lenses of one confuser kind, from the simulator's ``truth.csv``).

Prints one table (AUC, TPR0, TPR10 on both test sets, the gap, per-kind AUC on the shifted set) and
writes ``quality.json`` / ``quality.md`` into ``--out``. Finished steps are skipped on a rerun, so an
interrupted benchmark continues. Targets (issue 14, at 4x50x50 after <= 30 min on 2 CPU cores): shifted
AUC >= 0.95, TPR10 >= 0.5 under ``challenge``, own minus shifted AUC <= 0.02.

    python benchmarks/quality.py [--out quality_output] [--n-train 20000] [--n-shifted 4000]
                                 [--nets lastro] [--rules challenge paper] [--seeds 0]
    python benchmarks/quality.py --quick          # a few minutes: the whole chain on a small set
    python benchmarks/quality.py --full --gpu     # 4x200x200 on a CUDA machine
    python benchmarks/quality.py --ablate [--quick] [--seeds 0 1]

``--ablate`` writes ``ablation.md`` / ``ablation.json`` instead (issue 14's ablations): fixed rows, each one
change against the baseline (LASTRO ``configs/lastro.yaml``, challenge rule, asinh, all bands, D4, randomised
training data, the full ``--n-train``): input mode clip, VIS only, 4x100x100 unbinned, no augmentation, D4 +
shift/flux/noise jitter, the classic (not randomised) training set, resnet / twobranch / vit, the first third
of the IDs (``preprocess --limit``), the paper rule, AdamW + cosine + EMA, 4x the epochs. Every row runs for
every seed (default 0 1) and is judged on its own test split and the shifted set; one line per row gives the mean and
min..max over seeds. Stores and runs are shared where rows coincide (the baseline's store serves every row
that only changes training) and with the plain benchmark's (same names), so finished steps are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from lensray.errors import LensrayError
from lensray.ingest.store import LensStore
from lensray.runs import HISTORY_FILE
from lensray.sky.catalog import CATALOG_NAME

ROOT = Path(__file__).resolve().parents[1]
SHIFTED_FIRST_ID = 900001  # shifted IDs never collide with the training set's (from 200001)


@dataclass(frozen=True)
class Plan:
    out: Path
    n_train: int
    n_shifted: int
    nets: tuple[str, ...]
    rules: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    steps_per_epoch: int | None
    full: bool
    device: str
    ablate: bool = False
    data_seed: int = 2026

    @property
    def geometry(self) -> list[str]:
        return [] if self.full else ["--crop", "100", "--bin", "2"]


@dataclass
class Row:
    net: str
    rule: str
    seed: int
    train_s: float
    own: dict[str, float]
    shifted: dict[str, float]
    shifted_by_kind: dict[str, float] = field(default_factory=dict)
    shifted_by_lens: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return self.own["auc"] - self.shifted["auc"]


def lensray(*args: str) -> None:
    """One ``lensray`` command, its output passed through; a failure stops the benchmark."""
    command = [sys.executable, "-m", "lensray", "-q", *args]
    print("$ lensray " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def simulate(plan: Plan) -> tuple[Path, Path]:
    return simulate_set(plan, "randomised"), simulate_set(plan, "shifted")


def simulate_set(plan: Plan, preset: str) -> Path:
    """One simulated set: ``randomised`` (training), ``shifted`` (evaluation only) or ``classic`` (the
    randomisation ablation: the training set's size, seed and IDs, without domain randomisation)."""
    n, seed, first = {
        "randomised": (plan.n_train, plan.data_seed, 200001),
        "classic": (plan.n_train, plan.data_seed, 200001),
        "shifted": (plan.n_shifted, plan.data_seed + 1, SHIFTED_FIRST_ID),
    }[preset]
    root = plan.out / f"data_{preset}"
    if not (root / "truth.csv").exists():
        lensray(
            "simulate",
            "--out",
            str(root),
            "--n",
            str(n),
            "--seed",
            str(seed),
            "--preset",
            preset,
            "--set",
            f"simulate.first_id={first}",
        )
    return root


def preprocess(
    plan: Plan, data: Path, rule: str, name: str, evaluation_only: bool, extra: tuple[str, ...] = (), tag: str = ""
) -> Path:
    """A store of ``data`` under ``rule``; ``extra`` preprocess arguments make a variant named by ``tag``."""
    store = plan.out / f"store_{name}_{rule}{'_' + tag if tag else ''}.zarr"
    if not _store_finished(store):  # preprocess itself skips the shards a killed run finished
        # The shifted set is for evaluation only: nearly all of it is "test"; a small "val" split stays
        # because the report's validation-chosen threshold is read from it.
        splits = ["--set", "preprocess.val_fraction=0.1", "--set", "preprocess.test_fraction=0.89"]
        lensray(
            "preprocess",
            "--images",
            str(data),
            "--catalog",
            str(data / CATALOG_NAME),
            "--out",
            str(store),
            "--labels",
            rule,
            *plan.geometry,
            *(splits if evaluation_only else []),
            *extra,
        )
    return store


def _store_finished(store: Path) -> bool:
    try:
        return LensStore.open(str(store)).state == "finalized"
    except (LensrayError, FileNotFoundError):  # none yet, or one a killed run left unfinished
        return False


def train(
    plan: Plan, net: str, rule: str, seed: int, store: Path, tag: str = "", sets: tuple[str, ...] = ()
) -> tuple[Path, float]:
    """One run of ``configs/<net>.yaml``; ``sets`` are extra ``--set`` overrides, named in the run by ``tag``."""
    name = f"{net}-{rule}{'-' + tag if tag else ''}-seed{seed}"
    run = plan.out / "runs" / name
    timing = run / "quality_train_s.txt"
    if not timing.exists():
        started = time.perf_counter()
        steps = ["--steps-per-epoch", str(plan.steps_per_epoch)] if plan.steps_per_epoch else []
        # A run killed after an epoch is continued (then the time counts from the resume only).
        resume = ["--resume"] if (run / HISTORY_FILE).exists() else []
        lensray(
            "train",
            "--config",
            str(ROOT / "configs" / f"{net}.yaml"),
            "--store",
            str(store),
            "--out",
            str(plan.out / "runs"),
            "--name",
            name,
            "--epochs",
            str(plan.epochs),
            *steps,
            "--device",
            plan.device,
            "--set",
            f"train.seed={seed}",
            *resume,
            *(arg for override in sets for arg in ("--set", override)),
        )
        timing.write_text(f"{time.perf_counter() - started:.1f}\n")
    return run, float(timing.read_text())


def evaluate(plan: Plan, run: Path, store: Path, name: str) -> Path:
    out = plan.out / "evaluations" / f"{run.name}-on-{name}"
    if not (out / "metrics.json").exists():
        lensray("evaluate", "--run", str(run), "--store", str(store), "--out", str(out), "--device", plan.device)
    return out


def headline(evaluation: Path) -> dict[str, float]:
    metrics = json.loads((evaluation / "metrics.json").read_text())["metrics"]
    return {key: float(metrics[key]) for key in ("auc", "tpr0", "tpr10", "acc_at_validation")}


def predictions(evaluation: Path) -> list[tuple[int, int, float]]:
    """(ID, label, score) per object of an evaluation's ``predictions.csv``."""
    with (evaluation / "predictions.csv").open(newline="") as handle:
        return [(int(r["id"]), int(r["label"]), float(r["score"])) for r in csv.DictReader(handle)]


def auc_by_kind(evaluation: Path, truth_csv: Path) -> dict[str, float]:
    """Per confuser kind: AUC of all lenses against the non-lenses of that kind (NaN when too few)."""
    with truth_csv.open(newline="") as handle:
        kinds = {int(row["ID"]): row["kind"] for row in csv.DictReader(handle)}
    rows = predictions(evaluation)
    lens_scores = [s for _, y, s in rows if y == 1]
    out: dict[str, float] = {}
    for kind in sorted({kinds.get(i, "?") for i, y, _ in rows if y == 0}):
        negatives = [s for i, y, s in rows if y == 0 and kinds.get(i, "?") == kind]
        if len(negatives) >= 5 and lens_scores:
            labels = np.r_[np.ones(len(lens_scores)), np.zeros(len(negatives))]
            out[kind] = float(roc_auc_score(labels, np.r_[lens_scores, negatives]))
    return out


# What limits a network: the lenses of one bin of a property against all non-lenses. The Einstein radius comes
# from the simulator's truth, the arc's size (VIS pixels of the noiseless source above 1 sigma) from its
# catalogue; AUC that climbs with both says faint, small arcs are what is missed.
LENS_BINS: dict[str, tuple[float, ...]] = {
    "theta_e": (0.0, 0.6, 1.0, 1.6, float("inf")),
    "n_pix_source": (0, 80, 200, 500, float("inf")),
}


def lens_properties(data: Path) -> dict[int, dict[str, float]]:
    """Per ID: the ``LENS_BINS`` properties, from ``truth.csv`` and the catalogue of a simulated set."""
    out: dict[int, dict[str, float]] = {}
    with (data / "truth.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            out[int(row["ID"])] = {"theta_e": float(row["theta_e"])}
    with (data / CATALOG_NAME).open(newline="") as handle:
        for row in csv.DictReader(line for line in handle if not line.startswith("#")):
            out.setdefault(int(row["ID"]), {})["n_pix_source"] = float(row["n_pix_source"])
    return out


def auc_by_lens_bin(evaluation: Path, properties: dict[int, dict[str, float]]) -> dict[str, float]:
    """``"<property> <low>-<high>"`` -> AUC of the lenses in that bin against every non-lens (>= 5 lenses)."""
    rows = predictions(evaluation)
    negatives = [s for _, y, s in rows if y == 0]
    out: dict[str, float] = {}
    for name, edges in LENS_BINS.items():
        for low, high in pairwise(edges):
            lenses = [s for i, y, s in rows if y == 1 and low <= properties.get(i, {}).get(name, np.nan) < high]
            if len(lenses) >= 5 and negatives:
                labels = np.r_[np.ones(len(lenses)), np.zeros(len(negatives))]
                out[f"{name} {low:g}-{high:g}"] = float(roc_auc_score(labels, np.r_[lenses, negatives]))
    return out


def measure(plan: Plan) -> list[Row]:
    own_data, shifted_data = simulate(plan)
    rows = []
    for rule in plan.rules:
        own_store = preprocess(plan, own_data, rule, "randomised", evaluation_only=False)
        shifted_store = preprocess(plan, shifted_data, rule, "shifted", evaluation_only=True)
        for net in plan.nets:
            for seed in plan.seeds:
                run, train_s = train(plan, net, rule, seed, own_store)
                own_eval = evaluate(plan, run, own_store, "own")
                shifted_eval = evaluate(plan, run, shifted_store, "shifted")
                rows.append(
                    Row(
                        net,
                        rule,
                        seed,
                        train_s,
                        headline(own_eval),
                        headline(shifted_eval),
                        auc_by_kind(shifted_eval, shifted_data / "truth.csv"),
                        auc_by_lens_bin(shifted_eval, lens_properties(shifted_data)),
                    )
                )
    return rows


def markdown(rows: list[Row]) -> str:
    kinds = sorted({k for row in rows for k in row.shifted_by_kind})
    head = ["network", "rule", "seed", "train min", "own AUC", "own TPR10", "shifted AUC", "shifted TPR0"]
    head += ["shifted TPR10", "gap", *(f"{k} AUC" for k in kinds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.net, r.rule, str(r.seed), f"{r.train_s / 60:.1f}", f"{r.own['auc']:.3f}", f"{r.own['tpr10']:.2f}"]
        cells += [f"{r.shifted['auc']:.3f}", f"{r.shifted['tpr0']:.2f}", f"{r.shifted['tpr10']:.2f}", f"{r.gap:+.3f}"]
        cells += [f"{r.shifted_by_kind[k]:.3f}" if k in r.shifted_by_kind else "-" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + lens_bin_markdown(rows)


def lens_bin_markdown(rows: list[Row]) -> str:
    """Shifted-set AUC per bin of a lens property (``LENS_BINS``): which lenses the network misses."""
    bins = list(dict.fromkeys(k for row in rows for k in row.shifted_by_lens))
    if not bins:
        return ""
    head = ["network", "rule", "seed", *(f"{b}" for b in bins)]
    lines = ["", "Shifted AUC of the lenses in one bin against all non-lenses (theta_e in arcsec; n_pix_source:"]
    lines += ["the arc's VIS pixels above 1 sigma):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.net,
            r.rule,
            str(r.seed),
            *(f"{r.shifted_by_lens[b]:.3f}" if b in r.shifted_by_lens else "-" for b in bins),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- Ablations (``--ablate``): one change per row against the baseline, every row for every seed --------------


@dataclass(frozen=True)
class Variant:
    """One ablation row: the baseline (LASTRO, ``configs/lastro.yaml``, challenge rule, asinh, all bands, D4,
    randomised training data, the full ``--n-train``) with a single change."""

    factor: str
    setting: str
    net: str = "lastro"
    rule: str = "challenge"
    data: str = "randomised"  # preset of the training set; the shifted set is the same for every row
    store_args: tuple[str, ...] = ()  # preprocess arguments for the training AND the shifted store
    store_tag: str = ""
    subset: bool = False  # train on the first n_train // 3 IDs (``preprocess --limit``)
    train_sets: tuple[str, ...] = ()  # extra ``train --set`` overrides
    run_tag: str = ""
    epochs_factor: int = 1  # the training budget: this many times ``--epochs`` (same steps per epoch)


ABLATIONS = (
    Variant("baseline", "lastro, challenge, asinh, all bands, d4, randomised, full n"),
    Variant("input mode", "clip", store_args=("--set", "preprocess.mode=clip"), store_tag="clip"),
    Variant("bands", "VIS only", store_args=("--bands", "VIS"), store_tag="vis"),
    # The smallest arcs are lost to the 2x binning (README "What limits it"): the same 10" at full resolution.
    Variant("geometry", '4x100x100: the central 10" unbinned', store_args=("--bin", "1"), store_tag="bin1"),
    Variant("augmentation", "none", train_sets=("train.augment=none",), run_tag="noaug"),
    Variant(
        "augmentation",
        "d4 + shift 1 px, flux 0.1, noise 0.05",
        train_sets=("train.shift_px=1", "train.flux_jitter=0.1", "train.noise_jitter=0.05"),
        run_tag="jitter",
    ),
    Variant("randomisation", "off (classic preset, same n and seed)", data="classic"),
    Variant("network", "resnet", net="resnet"),
    Variant("network", "twobranch", net="twobranch"),
    Variant("network", "vit", net="vit"),
    Variant("training-set size", "first 1/3 of the IDs", subset=True),
    Variant("label rule", "paper", rule="paper"),
    Variant(
        "recipe",
        "adamw wd 0.05, cosine + 1 warm-up epoch, EMA 0.99",
        train_sets=(
            "optim.name=adamw",
            "optim.weight_decay=0.05",
            "optim.schedule=cosine",
            "optim.warmup_epochs=1",
            "optim.ema_decay=0.99",
        ),
        run_tag="adamw",
    ),
    Variant("training budget", "4x the epochs", epochs_factor=4, run_tag="x4"),
)


@dataclass
class AblationRow:
    factor: str
    setting: str
    runs: list[dict[str, float]] = field(default_factory=list)  # per seed: seed, train_min, own_auc, ...
    failed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean, min and max over the finished seeds of each figure."""
        keys = ("own_auc", "shifted_auc", "shifted_tpr10", "gap", "train_min")
        values = {k: np.array([run[k] for run in self.runs], dtype=float) for k in keys}
        return {k: {"mean": v.mean(), "min": v.min(), "max": v.max()} for k, v in values.items() if v.size}


def measure_variant(plan: Plan, variant: Variant, seed: int) -> dict[str, float]:
    """Train one seed of a row; evaluate it on its own test split and on the shifted set."""
    own_data, shifted_data = simulate_set(plan, variant.data), simulate_set(plan, "shifted")
    store_kw = {"extra": variant.store_args, "tag": variant.store_tag}
    full_store = preprocess(plan, own_data, variant.rule, variant.data, evaluation_only=False, **store_kw)
    shifted_store = preprocess(plan, shifted_data, variant.rule, "shifted", evaluation_only=True, **store_kw)
    train_store, subset_tag = full_store, ""
    if variant.subset:
        # Splits are a hash of (seed, ID), so the subset's training IDs are training IDs of the full store
        # too: the run is judged on the full store's test split, the same one as the baseline's.
        n = max(plan.n_train // 3, 1)
        subset_tag = f"first{n}"
        train_store = preprocess(plan, own_data, variant.rule, variant.data, False, ("--limit", str(n)), subset_tag)
    tag = "-".join(
        t
        for t in (variant.data if variant.data != "randomised" else "", variant.store_tag, subset_tag, variant.run_tag)
        if t
    )
    budget = replace(plan, epochs=plan.epochs * variant.epochs_factor)
    run, train_s = train(budget, variant.net, variant.rule, seed, train_store, tag, variant.train_sets)
    own = headline(evaluate(plan, run, full_store, "own"))
    shifted = headline(evaluate(plan, run, shifted_store, "shifted"))
    return {
        "seed": seed,
        "train_min": train_s / 60,
        "own_auc": own["auc"],
        "own_tpr10": own["tpr10"],
        "shifted_auc": shifted["auc"],
        "shifted_tpr10": shifted["tpr10"],
        "gap": own["auc"] - shifted["auc"],
    }


def ablate(plan: Plan) -> list[AblationRow]:
    """Every row for every seed, the tables rewritten after each row (a long run can be read while it goes).
    A failed command marks its row and seed and the next one starts; the exit status says so at the end."""
    rows: list[AblationRow] = []
    for variant in ABLATIONS:
        row = AblationRow(variant.factor, variant.setting)
        rows.append(row)
        for seed in plan.seeds:
            try:
                row.runs.append(measure_variant(plan, variant, seed))
            except subprocess.CalledProcessError as exc:
                print(f"ablation {variant.factor}: {variant.setting}, seed {seed} failed: {exc}", flush=True)
                row.failed.append(f"seed {seed}: {exc}")
        write_ablation(plan, rows)
    return rows


def ablation_markdown(rows: list[AblationRow]) -> str:
    head = ["factor", "setting", "seeds", "own AUC", "shifted AUC", "shifted TPR10", "gap", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    formats = {"own_auc": ".3f", "shifted_auc": ".3f", "shifted_tpr10": ".2f", "gap": "+.3f", "train_min": ".1f"}
    for row in rows:
        summary = row.summary()
        seeds = ",".join(str(int(run["seed"])) for run in row.runs) or "-"
        seeds += f" ({len(row.failed)} failed)" if row.failed else ""
        cells = [row.factor, row.setting, seeds]
        for key, fmt in formats.items():
            if key not in summary:
                cells.append("-")
                continue
            s = summary[key]
            spread = f" ({s['min']:{fmt}}..{s['max']:{fmt}})" if len(row.runs) > 1 else ""
            cells.append(f"{s['mean']:{fmt}}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    note = "Mean over seeds (min..max); gap = own AUC - shifted AUC; own test of the size row: the full store's.\n"
    return "\n".join(lines) + "\n\n" + note


def write_ablation(plan: Plan, rows: list[AblationRow]) -> str:
    table = ablation_markdown(rows)
    (plan.out / "ablation.md").write_text(table)
    record = {
        "plan": {k: str(v) for k, v in asdict(plan).items()},
        "rows": [asdict(r) | {"summary": r.summary()} for r in rows],
    }
    (plan.out / "ablation.json").write_text(json.dumps(record, indent=1))
    return table


def parse(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="quality_output")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-shifted", type=int, default=4000)
    parser.add_argument("--nets", nargs="+", default=["lastro"])
    parser.add_argument("--rules", nargs="+", default=["challenge", "paper"])
    parser.add_argument("--seeds", nargs="+", type=int, help="default 0; 0 1 with --ablate")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--steps-per-epoch", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="a small set and a short run (minutes)")
    parser.add_argument("--full", action="store_true", help="4x200x200 instead of the CPU geometry 4x50x50")
    parser.add_argument("--gpu", action="store_true", help="train and evaluate on CUDA")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="the ablation table (ablation.md/.json): fixed rows against the LASTRO/challenge baseline; "
        "--nets and --rules are not used",
    )
    a = parser.parse_args(argv)
    if a.seeds is None:
        a.seeds = [0, 1] if a.ablate else [0]
    if a.quick:
        a.n_train, a.n_shifted, a.epochs, a.steps_per_epoch, a.rules = 800, 300, 4, 20, ["challenge"]
    return Plan(
        Path(a.out).resolve(),
        a.n_train,
        a.n_shifted,
        tuple(a.nets),
        tuple(a.rules),
        tuple(a.seeds),
        a.epochs,
        a.steps_per_epoch,
        a.full,
        "cuda" if a.gpu else "cpu",
        ablate=a.ablate,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse(argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.ablate:
        ablation = ablate(plan)
        print("\n" + write_ablation(plan, ablation))
        print(f"written: {plan.out / 'ablation.md'}, {plan.out / 'ablation.json'}")
        return 1 if any(row.failed for row in ablation) else 0
    rows = measure(plan)
    table = markdown(rows)
    (plan.out / "quality.md").write_text(table)
    record = {"plan": {k: str(v) for k, v in asdict(plan).items()}, "rows": [asdict(r) | {"gap": r.gap} for r in rows]}
    (plan.out / "quality.json").write_text(json.dumps(record, indent=1))
    print("\n" + table)
    print(f"written: {plan.out / 'quality.md'}, {plan.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
