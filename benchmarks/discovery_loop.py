"""The discovery loop on simulated data: score -> grade the top N -> fine-tune on the grades -> score again.

Every step is a normal ``lensray`` command run as a subprocess, with fixed seeds, except the grading, which
a person does on ``lensray grade``'s page; here the simulator's ``truth.csv`` grades instead, written through
the same grades-file API the page uses (``lensray.grade.grades.GradeBook``: lens -> A, non-lens -> X, a few
C at random), so the files are exactly what a person's grading leaves:

1. ``lensray simulate``: a training set (``randomised`` priors) and a separate "survey" (``shifted`` priors by
   default: data the simulation-trained network does not quite match, as a real survey; IDs from 900001,
   a lens fraction of its own).
2. ``lensray preprocess`` the training set; ``lensray train`` an initial LASTRO (``configs/lastro.yaml``, short).
3. Round k, in ``rounds/roundK/``: ``lensray score`` the survey -> ``candidates.parquet``; grade the first N
   candidates not graded in an earlier round -> ``grades.parquet``. Unless it is the last round:
   ``lensray grade-merge`` every round's grades so far -> ``lensray grades-to-catalog`` -> ``lensray
   preprocess`` that catalogue over the survey's cutouts into a labelled store -> ``lensray train --init-from``
   the round's run on the training store plus the graded store (``--store-weights 0.7,0.3``) -> the next
   round's run.
4. ``lensray report-loop`` over the rounds, with the survey's truth: ``report/report.md``, ``report.json``,
   ``purity.png``; the purity per round is printed.

Finished steps are skipped on a rerun (a store that is finalized, a run with its timing file, a candidates
file, a round's grades), so an interrupted benchmark continues where it stopped. ``timings.json`` records
each step's wall time.

    python benchmarks/discovery_loop.py [--out discovery_output] [--n-train 2000] [--n-survey 1000]
                                        [--top 100] [--rounds 3] [--epochs 8] [--steps-per-epoch 40]
                                        [--init-run RUN --train-store STORE] [--control] [--freeze N]

``--init-run`` starts from a network already trained (``make quality``'s, say) on ``--train-store``;
``--control`` adds, per round, the same fine-tune without grades, and ``control.json`` compares both arms'
true purity of the top N (fresh, and among the IDs no round graded).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lensray.errors import LensrayError
from lensray.grade.grades import GradeBook, grade_record
from lensray.ingest.store import LensStore

ROOT = Path(__file__).resolve().parents[1]
SURVEY_FIRST_ID = 900001  # survey IDs never collide with the training set's (from 200001)
GRADER = "truth"  # the grader's name in the grades files: the simulator's truth


@dataclass(frozen=True)
class Plan:
    out: Path
    n_train: int
    n_survey: int
    survey_preset: str
    survey_lens_fraction: float
    top: int
    rounds: int
    epochs: int
    steps_per_epoch: int
    finetune_epochs: int
    finetune_lr: float
    weights: tuple[float, float]
    c_rate: float
    device: str
    train_store: Path | None = None  # reuse a finished training store and ...
    init_run: Path | None = None  # ... the network trained on it as round 0 (e.g. ``make quality``'s)
    control: bool = False  # also fine-tune without grades, the same steps, and compare the fresh purity
    freeze: int = 0  # fine-tunes keep the network's first blocks fixed (``train --freeze``)
    data_seed: int = 2026

    @property
    def finetune_args(self) -> list[str]:
        return ["--lr", str(self.finetune_lr), "--freeze", str(self.freeze), "--set", "train.sanity=false"]

    @property
    def geometry(self) -> list[str]:
        return ["--crop", "100", "--bin", "2"]  # the demo's 4x50x50, CPU-sized


class Clock:
    """Each step's wall time, kept in ``timings.json`` (a rerun keeps the times of the steps it skips)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, step: str, *args: str) -> None:
        started = time.perf_counter()
        lensray(*args)
        self.times[step] = round(time.perf_counter() - started, 1)
        self.path.write_text(json.dumps(self.times, indent=1))


def lensray(*args: str) -> None:
    """One ``lensray`` command, its output passed through; a failure stops the benchmark."""
    print("$ lensray " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lensray", "-q", *args], check=True, cwd=ROOT)


def simulate(plan: Plan, clock: Clock) -> tuple[Path, Path]:
    train_data, survey = plan.out / "data_train", plan.out / "data_survey"
    sets = [(survey, plan.survey_preset, plan.n_survey, plan.data_seed + 1, SURVEY_FIRST_ID, plan.survey_lens_fraction)]
    if plan.init_run is None:
        sets.insert(0, (train_data, "randomised", plan.n_train, plan.data_seed, 200001, 0.5))
    for root, preset, n, seed, first, fraction in sets:
        if not (root / "truth.csv").exists():
            clock.run(
                f"simulate {root.name}",
                *("simulate", "--out", str(root), "--n", str(n), "--seed", str(seed), "--preset", preset),
                *("--set", f"simulate.first_id={first}", "--set", f"simulate.lens_fraction={fraction}"),
            )
    return train_data, survey


def store_finished(store: Path) -> bool:
    try:
        return LensStore.open(str(store)).state == "finalized"
    except (LensrayError, FileNotFoundError):  # none yet, or one a killed run left unfinished
        return False


def preprocess(plan: Plan, clock: Clock, store: Path, images: Path, catalog: Path, *extra: str) -> Path:
    if not store_finished(store):  # preprocess itself skips the shards a killed run finished
        clock.run(
            f"preprocess {store.name}",
            *("preprocess", "--images", str(images), "--catalog", str(catalog), "--out", str(store)),
            *plan.geometry,
            *extra,
        )
    return store


def train(plan: Plan, clock: Clock, name: str, stores: list[Path], *extra: str) -> Path:
    run = plan.out / "runs" / name
    done = run / "loop_train_s.txt"
    if not done.exists():
        started = time.perf_counter()
        store_args = [arg for store in stores for arg in ("--store", str(store))]
        clock.run(
            f"train {name}",
            *("train", "--config", str(ROOT / "configs" / "lastro.yaml"), *store_args),
            *("--out", str(plan.out / "runs"), "--name", name, "--device", plan.device),
            *("--steps-per-epoch", str(plan.steps_per_epoch), "--set", "train.seed=0"),
            *extra,
        )
        done.write_text(f"{time.perf_counter() - started:.1f}\n")
    return run


def score(plan: Plan, clock: Clock, run: Path, survey: Path, round_dir: Path, name: str = "candidates") -> Path:
    candidates = round_dir / f"{name}.parquet"
    if not candidates.exists():
        clock.run(
            f"score {round_dir.name}{'' if name == 'candidates' else ' ' + name}",
            *("score", "--run", str(run), "--images", str(survey)),
            *("--catalog", str(survey / "image_catalog2.0train.csv"), "--out", str(candidates)),
            *("--device", plan.device, "--gallery", "0"),
        )
    return candidates


def fresh_top(candidates: pd.DataFrame, earlier: set[int], top: int) -> pd.DataFrame:
    """The first ``top`` scored candidates (rejects have no score) whose IDs are not in ``earlier``."""
    return candidates[candidates["score"].notna() & ~candidates["id"].isin(list(earlier))].head(top)


def grade_from_truth(plan: Plan, candidates: Path, truth: dict[int, bool], earlier: set[int], out: Path) -> int:
    """Grade the first ``top`` candidates not graded in an earlier round, as a person would on the page:
    through ``GradeBook`` (journal + Parquet). Lens -> A, non-lens -> X; with probability ``c_rate`` a C
    instead (undecided, left out of the catalogue). Seeded per ID; a rerun adds only what is missing."""
    frame = fresh_top(pd.read_parquet(candidates), earlier, plan.top)
    book = GradeBook(out)
    done = book.grades_of(GRADER)
    for row in frame.to_dict(orient="records"):
        object_id = int(row["id"])
        if object_id in done:
            continue
        unsure = np.random.default_rng([plan.data_seed, object_id]).random() < plan.c_rate
        grade = "C" if unsure else "A" if truth[object_id] else "X"
        book.add(grade_record(row, grade, "graded from the simulator's truth.csv", GRADER))
    return len(frame)


def read_truth(survey: Path) -> dict[int, bool]:
    with (survey / "truth.csv").open(newline="") as handle:
        return {int(row["ID"]): row["is_lens"].strip().lower() in ("1", "true") for row in csv.DictReader(handle)}


def graded_ids(paths: list[Path]) -> set[int]:
    return {int(i) for path in paths for i in pd.read_parquet(path, columns=["id"])["id"]}


def finetune(plan: Plan, clock: Clock, k: int, run: Path, survey: Path, train_store: Path, grades: list[Path]) -> Path:
    """Every round's grades so far -> a labelled catalogue -> a store of the survey's cutouts -> the next run."""
    round_dir = grades[-1].parent
    merged, labels = round_dir / "grades_so_far.parquet", round_dir / "labels.parquet"
    if not labels.exists():
        clock.run(f"grade-merge round{k}", "grade-merge", *map(str, grades), "--out", str(merged))
        clock.run(f"grades-to-catalog round{k}", "grades-to-catalog", str(merged), "--out", str(labels))
    graded = preprocess(
        plan,
        clock,
        plan.out / f"store_graded_round{k}.zarr",
        survey,
        labels,
        *("--label-column", "label", "--set", "preprocess.test_fraction=0.0"),
    )
    weights = ",".join(str(w) for w in plan.weights)
    return train(
        plan,
        clock,
        f"round{k + 1}",
        [train_store, graded],
        *("--store-weights", weights, "--init-from", str(run), "--epochs", str(plan.finetune_epochs)),
        *plan.finetune_args,
    )


def control(plan: Plan, clock: Clock, k: int, run: Path, train_store: Path) -> Path:
    """Round k's control: the same fine-tune (epochs, steps, learning rate) from the previous control on the
    training store alone, no grades: what the extra steps give without a person's grades."""
    return train(
        plan,
        clock,
        f"control{k}",
        [train_store],
        *("--init-from", str(run), "--epochs", str(plan.finetune_epochs)),
        *plan.finetune_args,
    )


def fresh_purity(candidates: Path, earlier: set[int], truth: dict[int, bool], top: int) -> float:
    """True purity of the first ``top`` candidates not in ``earlier`` (graded in an earlier round, or at all)."""
    fresh = fresh_top(pd.read_parquet(candidates, columns=["id", "score"]), earlier, top)
    return float(np.mean([truth[int(i)] for i in fresh["id"]]))


def compare_control(plan: Plan, rows: list[dict[str, float | str]], truth: dict[int, bool], graded: set[int]) -> None:
    """Adds each arm's true purity of the top N among the IDs no round graded (the same pool for both arms and
    every round), writes ``control.json`` and prints both comparisons."""
    for row in rows:
        round_dir = plan.out / "rounds" / str(row["round"])
        for arm, name in (("loop", "candidates"), ("control", "control_candidates")):
            row[f"{arm}_never_graded"] = fresh_purity(round_dir / f"{name}.parquet", graded, truth, plan.top)
    (plan.out / "control.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(
            f"{row['round']}: true purity, top {plan.top}: fresh: loop {row['loop']:.3f}, control (same steps, no "
            f"grades) {row['control']:.3f}; never graded: loop {row['loop_never_graded']:.3f}, "
            f"control {row['control_never_graded']:.3f}"
        )


def loop(plan: Plan) -> Path:
    clock = Clock(plan.out / "timings.json")
    train_data, survey = simulate(plan, clock)
    if plan.init_run is not None and plan.train_store is not None:
        train_store, run = plan.train_store, plan.init_run
    else:
        catalog = train_data / "image_catalog2.0train.csv"
        train_store = preprocess(plan, clock, plan.out / "store_train.zarr", train_data, catalog)
        run = train(plan, clock, "round0", [train_store], "--epochs", str(plan.epochs))
    truth = read_truth(survey)
    grades: list[Path] = []
    control_run, control_rows = run, []
    for k in range(plan.rounds):
        round_dir = plan.out / "rounds" / f"round{k}"
        round_dir.mkdir(parents=True, exist_ok=True)
        candidates = score(plan, clock, run, survey, round_dir)
        earlier = graded_ids(grades)
        if plan.control and k > 0:
            control_run = control(plan, clock, k, control_run, train_store)
            controlled = score(plan, clock, control_run, survey, round_dir, "control_candidates")
            loop_purity, control_purity = (fresh_purity(p, earlier, truth, plan.top) for p in (candidates, controlled))
            control_rows.append({"round": f"round{k}", "loop": loop_purity, "control": control_purity})
        grades.append(round_dir / "grades.parquet")
        n = grade_from_truth(plan, candidates, truth, earlier, grades[-1])
        print(f"round {k}: graded {n} candidates from truth -> {grades[-1]}", flush=True)
        if k + 1 < plan.rounds:
            run = finetune(plan, clock, k, run, survey, train_store, grades)
    if control_rows:
        compare_control(plan, control_rows, truth, graded_ids(grades))
    report = plan.out / "report"
    rounds = [str(path.parent) for path in grades]
    truth_csv = str(survey / "truth.csv")
    clock.run("report-loop", "report-loop", *rounds, "--out", str(report), "--top", str(plan.top), "--truth", truth_csv)
    return report


def parse(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="discovery_output")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-survey", type=int, default=1000)
    parser.add_argument("--survey-preset", default="shifted", choices=("randomised", "shifted", "classic"))
    parser.add_argument("--survey-lens-fraction", type=float, default=0.2)
    parser.add_argument("--top", type=int, default=100, help="candidates graded per round (N)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds scored and graded (fine-tunes: rounds - 1)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the initial run")
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--weights", default="0.7,0.3", help="training store, graded store")
    parser.add_argument("--c-rate", type=float, default=0.05, help="share of grades made C (left out)")
    parser.add_argument("--gpu", action="store_true", help="train and score on CUDA")
    parser.add_argument("--control", action="store_true", help="also the same fine-tunes without grades")
    parser.add_argument("--freeze", type=int, default=0, help="fine-tunes keep the first N blocks fixed")
    parser.add_argument(
        "--init-run", type=Path, help="round 0's network, already trained (skips simulating and training)"
    )
    parser.add_argument(
        "--train-store", type=Path, help="the store --init-run was trained on (4x50x50: crop 100, bin 2)"
    )
    a = parser.parse_args(argv)
    if (a.init_run is None) != (a.train_store is None):
        parser.error("--init-run and --train-store go together")
    first, second = (float(w) for w in a.weights.split(","))
    return Plan(
        Path(a.out).resolve(),
        a.n_train,
        a.n_survey,
        a.survey_preset,
        a.survey_lens_fraction,
        a.top,
        a.rounds,
        a.epochs,
        a.steps_per_epoch,
        a.finetune_epochs,
        a.finetune_lr,
        (first, second),
        a.c_rate,
        "cuda" if a.gpu else "cpu",
        train_store=a.train_store.resolve() if a.train_store else None,
        init_run=a.init_run.resolve() if a.init_run else None,
        control=a.control,
        freeze=a.freeze,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse(argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "plan.json").write_text(json.dumps({k: str(v) for k, v in asdict(plan).items()}, indent=1))
    started = time.perf_counter()
    report = loop(plan)
    summary = json.loads((report / "report.json").read_text())
    for row in summary["rounds"]:
        print(
            f"{row['round']}: purity top {plan.top} (not yet graded, graded A/B) {row['graded_purity_fresh']}, "
            f"true {row.get('true_purity_fresh')}, never graded {row.get('true_purity_never_graded')}"
        )
    print(f"this invocation: {time.perf_counter() - started:.0f} s; steps: {plan.out / 'timings.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
