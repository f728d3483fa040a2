"""sfx-live's per-frame analysis side by side with DIALS' dials.stills_process on the same simulated NXmx frames.

Run: ``python -m benchmarks.dials_compare [--frames 20] [--workdir DIR]`` (not part of ``make bench``: DIALS takes
minutes). Both sides get the known cell and space group and run in one process on one core. DIALS runs under the
Debian python (``dials.import``, ``dials.stills_process`` with mp.nproc=1 and an empty ``xfel_mono_sim_ext`` module
on PYTHONPATH, which these packages need); its CPU seconds are the user + system time of the dials.stills_process
child, start-up included (a few seconds, shared by all frames; dials.import is reported apart). Ours are this
process's CPU time, reading each frame from the same file included. Indexing rate = correctly indexed frames /
frames that are hits in the truth; a solution more than 1° from the truth is counted as wrong.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from libs.contracts.parameters import AnalysisParameters  # noqa: E402
from libs.science.crystal import lattice_operators, misorientation_degrees  # noqa: E402
from libs.science.formats import open_run, open_run_writer  # noqa: E402
from libs.simulator import Experiment, SimulationConfig  # noqa: E402
from services.analysis.pipeline import process_frame  # noqa: E402

HEAD_FRAMES = 4

DIALS_PHIL = """
dispatch.hit_finder.minimum_number_of_reflections = {min_spots}
indexing.known_symmetry.space_group = {space_group}
indexing.known_symmetry.unit_cell = {cell}
indexing.stills.refine_candidates_with_known_symmetry = True
output.composite_output = True
mp.nproc = 1
"""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dials(master: Path, workdir: Path, config: SimulationConfig, min_spots: int) -> tuple[float, float, dict]:
    """CPU seconds of dials.import and of dials.stills_process, and the integrated experiments (JSON)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stub = workdir / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "xfel_mono_sim_ext.py").write_text("")
    environment = {**os.environ, "PYTHONPATH": str(stub)}
    environment.pop("VIRTUAL_ENV", None)
    environment["PATH"] = ":".join(p for p in environment.get("PATH", "").split(":") if ".venv" not in p)
    phil = workdir / "stills.phil"
    phil.write_text(
        DIALS_PHIL.format(
            min_spots=min_spots,
            space_group=config.space_group.replace(" ", ""),
            cell=",".join(str(x) for x in config.cell),
        )
    )
    before = children_cpu_seconds()
    subprocess.run(
        ["dials.import", str(master)], cwd=workdir, env=environment, check=True, capture_output=True, text=True
    )
    after_import = children_cpu_seconds()
    subprocess.run(
        ["dials.stills_process", "imported.expt", str(phil), "output.output_dir=out"],
        cwd=workdir,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    after_process = children_cpu_seconds()
    integrated = sorted((workdir / "out").glob("*integrated.expt"))
    experiments: dict = {"experiment": [], "imageset": [], "crystal": []}
    for path in integrated:
        content = json.loads(path.read_text())
        offset_imageset, offset_crystal = len(experiments["imageset"]), len(experiments["crystal"])
        for item in content["experiment"]:
            experiments["experiment"].append(
                {"imageset": item["imageset"] + offset_imageset, "crystal": item["crystal"] + offset_crystal}
            )
        experiments["imageset"].extend(content["imageset"])
        experiments["crystal"].extend(content["crystal"])
    return after_import - before, after_process - after_import, experiments


def dials_solutions(experiments: dict) -> dict[int, np.ndarray]:
    """Frame index → A (r = A·h, lab frame) of each frame DIALS integrated."""
    found: dict[int, np.ndarray] = {}
    for item in experiments["experiment"]:
        frame = experiments["imageset"][item["imageset"]]["single_file_indices"][0]
        crystal = experiments["crystal"][item["crystal"]]
        real = np.array([crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"]])
        found[int(frame)] = np.linalg.inv(real)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    arguments = parser.parse_args(argv)
    if shutil.which("dials.stills_process") is None:
        print("dials.stills_process not found: install the Debian packages dials and python3-dials")
        return 1
    workdir = arguments.workdir or Path(tempfile.mkdtemp(prefix="sfx-dials-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = SimulationConfig(seed=arguments.seed)
    experiment = Experiment(config)
    master = workdir / "run_master.h5"
    # The first few frames again, alone: the difference of the two runs is each program's cost per extra frame,
    # free of start-up (imports, caches), which a long run amortises.
    head = workdir / "head" / "run_master.h5"
    head.parent.mkdir(exist_ok=True)
    truths = []
    detector, beam, mask = experiment.detector, experiment.beam, experiment.mask
    with (
        open_run_writer(master, "nxmx", detector=detector, beam=beam, mask=mask) as w,
        open_run_writer(head, "nxmx", detector=detector, beam=beam, mask=mask) as w_head,
    ):
        for index in range(arguments.frames):
            frame = experiment.frame(index)
            w.append(frame.image)
            if index < HEAD_FRAMES:
                w_head.append(frame.image)
            truths.append(frame.truth)
    hits = [t.index for t in truths if t.hit]
    operators = lattice_operators(config.cell)
    parameters = AnalysisParameters()

    def verdict(solutions: dict[int, np.ndarray]) -> tuple[int, int, float]:
        right, wrong, angles = 0, 0, []
        for index, A in solutions.items():
            truth = truths[index]
            if truth.A is None:
                wrong += 1
                continue
            angle, _ = misorientation_degrees(A, truth.A, operators)
            angles.append(angle)
            right, wrong = (right + 1, wrong) if angle <= 1.0 else (right, wrong + 1)
        return right, wrong, float(np.median(angles)) if angles else float("nan")

    ours: dict[int, np.ndarray] = {}
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    our_head_cpu = 0.0
    with open_run(master) as reader:
        for index in range(reader.frame_count):
            if index == HEAD_FRAMES:
                our_head_cpu = time.process_time() - start_cpu
            analysis = process_frame(
                reader.read_frame(index),
                reader.detector,
                reader.beam,
                reader.mask,
                config.cell,
                config.space_group,
                parameters,
            )
            if analysis.indexed and analysis.A is not None:
                ours[index] = analysis.A
    our_cpu, our_wall = time.process_time() - start_cpu, time.perf_counter() - start_wall

    import_cpu, dials_cpu, experiments = run_dials(master, workdir, config, parameters.hitfinding.min_spots)
    _, dials_head_cpu, _ = run_dials(head, head.parent, config, parameters.hitfinding.min_spots)
    theirs = dials_solutions(experiments)

    n = arguments.frames
    extra = n - HEAD_FRAMES
    rows = [
        ("sfx-live process_frame", our_cpu, (our_cpu - our_head_cpu) / extra, ours),
        ("dials.stills_process", dials_cpu, (dials_cpu - dials_head_cpu) / extra, theirs),
    ]
    print(f"{n} frames ({len(hits)} hits) of the default simulation, {master}")
    print(f"{'program':<26}{'CPU s/frame':>12}{'marginal':>10}{'indexed':>9}{'rate':>7}{'wrong':>7}{'median err°':>13}")
    for label, cpu, marginal, solutions in rows:
        right, wrong, median = verdict(solutions)
        rate = right / max(len(hits), 1)
        counts = f"{right:>5}/{len(hits):<3}"
        print(f"{label:<26}{cpu / n:>12.3f}{marginal:>10.3f}{counts}{rate:>7.2f}{wrong:>7}{median:>13.4f}")
    ratio_total = dials_cpu / max(our_cpu, 1e-9)
    ratio_marginal = rows[1][2] / max(rows[0][2], 1e-9)
    print(f"CPU ratio dials/sfx-live: {ratio_total:.0f}× per frame overall, {ratio_marginal:.0f}× per extra frame")
    print(f"(CPU s/frame: whole run / frames, start-up included; marginal: (run − first {HEAD_FRAMES} frames alone)")
    print(f" / {extra} frames. dials.import took {import_cpu:.1f} s CPU, not counted.)")
    print(f"sfx-live wall time {our_wall:.2f} s for {n} frames, including reading them from the file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
