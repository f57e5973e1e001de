"""An ensemble against its best member on the same test objects, with compare's paired interval.

Everything goes through the normal ``lensray`` commands, so the figures can be reproduced by hand:

1. Members: by default ``lensray simulate`` (the ``randomised`` preset, ``--n`` objects), ``lensray
   preprocess`` and ``lensray train`` of ``--members`` networks with the demo's recipe
   (``lensray/resources/demo.yaml``: 4x50x50, LASTRO) that differ only in ``train.seed``; or the runs given
   with ``--runs``; or the top ``--top`` trials of a search with ``--from-search``.
2. ``lensray compare --runs A B C`` (or ``--from-search EXP --top K``): the ensemble (the mean of the
   members' probabilities, each with its own D4 averaging under ``--tta d4``) and every member on the test
   split of their training store (or ``--store``), and AUC(ensemble) - AUC(best member) with the paired
   bootstrap's 95 % interval (2,000 resamples of the test objects).

Prints the members' and the ensemble's AUC / TPR10 and the paired difference; compare's files (compare.md,
compare.html, compare.json, the ROC plot) stay in ``--out``/compare. Finished steps are skipped on a rerun.
CPU sized by default (3 members on 1,200 objects: minutes on 2 cores):

    python benchmarks/ensemble.py [--out ensemble_output] [--n 1200] [--members 3] [--epochs 12] [--tta d4]
    python benchmarks/ensemble.py --runs runs/lastro-1 runs/lastro-2 runs/resnet-1 [--store store.zarr]
    python benchmarks/ensemble.py --from-search experiments/lastro-search --top 3 [--store store.zarr]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "lensray" / "resources" / "demo.yaml"
DATA_SEED = 7


def lensray(*args: str) -> None:
    """One ``lensray`` command, its output passed through; a failure stops the benchmark."""
    print("$ lensray " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lensray", "-q", *args], check=True, cwd=ROOT)


def train_members(args: argparse.Namespace, out: Path) -> list[str]:
    """Simulate, preprocess and train ``args.members`` networks that differ only in their seed."""
    data, store, runs = out / "data", out / "store.zarr", out / "runs"
    if not (data / "truth.csv").exists():
        lensray("simulate", "--out", str(data), "--n", str(args.n), "--seed", str(DATA_SEED), "--preset", "randomised")
    if not _finalized(store):  # preprocess itself skips the shards a killed run finished
        catalog = data / "image_catalog2.0train.csv"
        lensray(
            "preprocess", "--config", str(RECIPE), "--images", str(data), "--catalog", str(catalog), "--out", str(store)
        )
    members = []
    for seed in range(args.members):
        name = f"member-seed{seed}"
        if not (runs / name / "history.json").exists():
            started = time.perf_counter()
            lensray(
                "train",
                "--config",
                str(RECIPE),
                "--store",
                str(store),
                "--out",
                str(runs),
                "--name",
                name,
                "--epochs",
                str(args.epochs),
                "--device",
                args.device,
                "--set",
                f"train.seed={seed}",
            )
            print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
        members.append(str(runs / name))
    return members


def _finalized(store: Path) -> bool:
    from lensray.errors import LensrayError
    from lensray.ingest.store import LensStore

    try:
        return LensStore.open(str(store)).state == "finalized"
    except (LensrayError, FileNotFoundError):
        return False


def compare(args: argparse.Namespace, out: Path, members: list[str]) -> dict:
    """``lensray compare`` of the ensemble and its members; compare.json's content."""
    folder = out / "compare"
    ensemble = ["--from-search", args.from_search, "--top", str(args.top)] if args.from_search else ["--runs", *members]
    extra = [*(["--store", args.store] if args.store else []), *(["--tta", args.tta] if args.tta else [])]
    lensray("compare", *ensemble, *extra, "--out", str(folder), "--device", args.device)
    return json.loads((folder / "compare.json").read_text())


def report(result: dict) -> str:
    """The members' and the ensemble's AUC / TPR10, then the ensemble against its best member."""
    lines = [f"{'':<28} {'AUC':>6} {'TPR10':>6}  (test objects: {result['rows'][0]['n']}, TTA {result['tta']})"]
    for row in result["rows"]:
        lines.append(f"{row['name']:<28} {row['auc']:>6.3f} {row['tpr10']:>6.3f}")
    gain = result["ensemble"]
    if gain is None:
        return "\n".join([*lines, "no paired difference: the test objects hold one class"])
    lines.append(
        f"ensemble - best member ({gain['member']}): AUC {gain['delta_auc']:+.3f} "
        f"[95% {gain['low']:+.3f}, {gain['high']:+.3f}], P(ensemble <= member) {gain['p_not_better']:.3f}; "
        f"TPR10 {gain['tpr10_ensemble']:.3f} vs {gain['tpr10_member']:.3f}"
    )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ensemble_output")
    members = parser.add_mutually_exclusive_group()
    members.add_argument("--runs", nargs="+", help="take these runs as the members (no training)")
    members.add_argument("--from-search", help="take the top --top trials of this search as the members")
    parser.add_argument("--top", type=int, default=3, help="with --from-search (default 3)")
    parser.add_argument("--store", help="evaluate on this store (default: the members' training store)")
    parser.add_argument("--n", type=int, default=1200, help="objects simulated when training members")
    parser.add_argument("--members", type=int, default=3, help="members trained (seeds 0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per trained member (the demo's recipe)")
    parser.add_argument("--tta", choices=("d4",), help="each member's own D4 averaging")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    members = [] if args.from_search else args.runs or train_members(args, out)
    result = compare(args, out, members)
    print(report(result))
    print(f"({time.perf_counter() - started:.0f} s; compare's files: {out / 'compare'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
