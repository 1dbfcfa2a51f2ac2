"""AiiDA plugin for EquiCSP: the model as data, ``equicsp sample`` as a calculation job, its parser, protocols.

- ``aiida_equicsp.data.model.EquiCSPModelData`` (entry point ``equicsp.model``): a checkpoint file;
- ``aiida_equicsp.calculations.sample.EquiCSPSampleCalculation`` (``equicsp.sample``): runs the ``equicsp``
  program on any computer; its parser ``aiida_equicsp.parsers.sample.EquiCSPSampleParser`` (``equicsp.sample``);
- ``aiida_equicsp.workchains.sample_base.EquiCSPSampleBaseWorkChain`` (``equicsp.sample.base``): the calculation
  restarted until every requested candidate exists (installed from the repository's ``workchains/`` folder), with
  ``get_builder_from_protocol`` from ``protocols/sample.yaml``;
- ``aiida_equicsp.protocols``: the protocol files and aiida-quantumespresso's ``ProtocolMixin`` over them;
- ``aiida_equicsp.calculations.relax.EquiCSPRelaxCalculation`` (``equicsp.relax``): ``equicsp relax``, an ML
  potential's relaxation, with its parser;
- ``aiida_equicsp.workchains.predict_relax.EquiCSPPredictRelaxWorkChain`` (``equicsp.predict_relax``): formulas to
  relaxed, ranked structures (sampling, screening, ML and DFT relaxation);
- ``aiida_equicsp.pseudos``: the PseudoDojo pseudopotential family with cutoffs, built offline;
- ``aiida_equicsp.campaign`` and ``aiida_equicsp.queries``: campaigns over many compositions, and the
  QueryBuilder recipes to read results back;
- ``aiida_equicsp.cli``: the ``aiida-equicsp`` command (``sample``, ``results``, ``install-pseudos``,
  ``campaign``).

Nothing here imports torch except the check of a checkpoint file and of the inputs before submission.
"""

__version__ = "0.1.0"
