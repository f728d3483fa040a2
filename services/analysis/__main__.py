"""``mpiexec -n N python -m services.analysis --job SPEC.json``: one analysis job (see services.analysis.job)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from libs.contracts.settings import get_settings
from libs.runtime.logging import configure_logging, get_logger
from libs.runtime.service import CredentialsError, check_credentials
from services.analysis.job import JobError, RankWorker, gather_totals, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.analysis", description=__doc__)
    parser.add_argument("--job", type=Path, required=True, help="JobSpec JSON written by the dispatcher")
    arguments = parser.parse_args(argv)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    settings = get_settings()
    configure_logging("analysis", settings.log_format, settings.log_level)
    log = get_logger("services.analysis")
    try:
        check_credentials(settings)  # a refused login ends the job at once, naming the user (never the password)
        spec = load_spec(arguments.job)
        structlog.contextvars.bind_contextvars(job_id=spec.job_id, rank=comm.Get_rank(), run_id=spec.manifest.run_id)
        worker = RankWorker(spec, comm, settings)
        progress = worker.run()
    except (JobError, CredentialsError) as error:
        log.error("job cannot run", error=str(error))
        print(f"analysis job failed: {error}", file=sys.stderr)
        if comm.Get_size() > 1:
            comm.Abort(3)  # the other ranks may wait in a collective call: end them all
        return 3
    totals = gather_totals(comm, progress)
    if comm.Get_rank() == 0:
        log.info("job finished", **totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
