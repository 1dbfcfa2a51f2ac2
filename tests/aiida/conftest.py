"""AiiDA test setup: a temporary SQLite profile (no broker), localhost, the ``equicsp`` code and a stored model.

aiida-core's fixtures are imported here rather than listed in ``pytest_plugins``: pytest accepts
``pytest_plugins`` only in the top-level conftest, where it would create an AiiDA profile for every
test session; imported here, the autouse ``aiida_profile`` serves the tests of this folder only.
Calculations run with ``aiida.engine.run`` on the ``core.direct`` scheduler, so no daemon or RabbitMQ.
"""

import sys
from pathlib import Path

import pytest
from aiida import orm
from aiida.common import log
from aiida.common.links import LinkType
from aiida.engine.utils import instantiate_process
from aiida.manage import get_manager
from aiida.plugins import ParserFactory
from aiida.tools.pytest_fixtures import (  # noqa: F401  (fixtures, found by pytest through this module)
    aiida_code,
    aiida_code_installed,
    aiida_computer,
    aiida_computer_local,
    aiida_config,
    aiida_config_factory,
    aiida_localhost,
    aiida_profile,
    aiida_profile_factory,
)

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation
from aiida_equicsp.data.model import EquiCSPModelData

#: The ``equicsp`` program of the virtual environment running the tests.
EQUICSP_EXECUTABLE = Path(sys.executable).parent / "equicsp"

#: An ``equicsp`` whose sampled (or generated) lattices are all a 4 Å cube, so every candidate of the undertrained
#: test models is a valid crystal (the same device as ``fixed_cell_sampler`` in ``tests/test_cli.py``).
FIXED_CELL_EQUICSP = '''#!{python}
import sys

import torch

from equicsp_core import generate, predict, sampler
from equicsp_core.cli import main


def fixed_cell_sample(*args, **kwargs):
    result = sampler.sample(*args, **kwargs)
    result.batch.lengths = torch.full_like(result.batch.lengths, 4.0)
    result.batch.angles = torch.full_like(result.batch.angles, 90.0)
    return sampler.SampleResult(result.batch, torch.ones_like(result.finite))


predict.sample = generate.sample = fixed_cell_sample
sys.exit(main())
'''

#: An ``equicsp`` that fails in a way no handler of the restart work chain knows: an error line, no results.
UNKNOWN_FAILURE_EQUICSP = """#!/bin/sh
echo "equicsp sample: error: the GPU caught fire" >&2
exit 1
"""


@pytest.fixture(autouse=True)
def logging_as_before_a_command():
    """Undo what verdi's ``--verbosity`` callback does to the process's logging when a test runs a command of
    ``aiida-equicsp`` in this process (CLI mode, no database handler), so that the work chains of later tests
    still store their reports."""
    yield
    if log.CLI_ACTIVE:
        log.CLI_ACTIVE = log.CLI_LOG_LEVEL = None
        log.configure_logging(with_orm=True)


@pytest.fixture
def equicsp_code(aiida_code_installed) -> orm.InstalledCode:
    """The venv's ``equicsp`` on localhost (core.direct scheduler)."""
    return aiida_code_installed(label="equicsp", default_calc_job_plugin="equicsp.sample",
                                filepath_executable=str(EQUICSP_EXECUTABLE))


@pytest.fixture
def fixed_cell_equicsp_code(aiida_code_installed, tmp_path_factory) -> orm.InstalledCode:
    """:data:`FIXED_CELL_EQUICSP` on localhost: every candidate valid."""
    script = tmp_path_factory.mktemp("fixed-cell") / "equicsp"
    script.write_text(FIXED_CELL_EQUICSP.format(python=sys.executable))
    script.chmod(0o755)
    return aiida_code_installed(label="equicsp-fixed-cell", default_calc_job_plugin="equicsp.sample",
                                filepath_executable=str(script))


@pytest.fixture
def script_code(aiida_code_installed, tmp_path):
    """``script_code(name, text)``: ``text`` as an executable ``tmp_path/name`` and a new InstalledCode of it.

    The label ends with the test's folder name, since ``aiida_code_installed`` returns the stored code of a
    label it has seen.
    """

    def factory(name: str, text: str) -> orm.InstalledCode:
        script = tmp_path / name
        script.write_text(text)
        script.chmod(0o755)
        return aiida_code_installed(label=f"{name}-{tmp_path.name}", default_calc_job_plugin="equicsp.sample",
                                    filepath_executable=str(script))

    return factory


@pytest.fixture
def unknown_failure_code(script_code) -> orm.InstalledCode:
    """:data:`UNKNOWN_FAILURE_EQUICSP` on localhost."""
    return script_code("equicsp-on-fire", UNKNOWN_FAILURE_EQUICSP)


@pytest.fixture(scope="session")
def model(tiny_checkpoint, aiida_profile) -> EquiCSPModelData:
    """The stored node of the session's tiny checkpoint."""
    return EquiCSPModelData.get_or_create(tiny_checkpoint)


@pytest.fixture(scope="session")
def generation_model(tiny_generation_checkpoint, aiida_profile) -> EquiCSPModelData:
    """The stored node of the session's tiny generation (ab initio) checkpoint."""
    return EquiCSPModelData.get_or_create(tiny_generation_checkpoint)


@pytest.fixture
def generate_calc_job(tmp_path):
    """Run ``prepare_for_submission`` of the sample calculation on ``inputs``; returns ``(folder, calcinfo)``."""
    from aiida.common.folders import Folder

    def factory(inputs: dict):
        (tmp_path / "sandbox").mkdir()
        folder = Folder(str(tmp_path / "sandbox"))
        process = instantiate_process(get_manager().get_runner(), EquiCSPSampleCalculation, **inputs)
        return folder, process.prepare_for_submission(folder)

    return factory


@pytest.fixture
def parse_retrieved(aiida_localhost):
    """Parse recorded files as the ``retrieved`` folder of a sample calculation.

    ``factory(files, compositions=("SrTiO3", "CaTiO3"), num_samples=2)`` takes ``{relative path: text}``
    and returns ``(outputs, calcfunction node)``; the node's ``exit_status`` and ``exit_message`` are the
    parser's verdict. ``compositions=None``: a generation calculation (no compositions input).
    """

    def factory(files: dict[str, str], compositions=("SrTiO3", "CaTiO3"), num_samples=2):
        node = orm.CalcJobNode(computer=aiida_localhost, process_type="aiida.calculations:equicsp.sample")
        node.set_option("resources", {"num_machines": 1, "num_mpiprocs_per_machine": 1})
        if compositions is not None:
            node.base.links.add_incoming(orm.List(list(compositions)).store(), LinkType.INPUT_CALC, "compositions")
        node.base.links.add_incoming(orm.Int(num_samples).store(), LinkType.INPUT_CALC, "num_samples")
        node.store()
        retrieved = orm.FolderData()
        for path, text in files.items():
            retrieved.base.repository.put_object_from_bytes(text.encode(), path)
        retrieved.base.links.add_incoming(node, LinkType.CREATE, "retrieved")
        retrieved.store()
        return ParserFactory("equicsp.sample").parse_from_node(node, store_provenance=False)

    return factory
