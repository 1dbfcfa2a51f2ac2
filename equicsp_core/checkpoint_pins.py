"""SHA-256 of every checkpoint file shipped in ``equicsp_core/checkpoints/``, checked on each load.

The one place to update when a checkpoint is (re-)shipped: ``sha256sum equicsp_core/checkpoints/<name>.pt``,
then the same hash in the model card ``<name>.md``. ``tests/test_checkpoint.py`` checks that every shipped
file matches its pin and that every pin has its file.
"""

SHIPPED_SHA256 = {
    "mp_20": "292a32e30d01183af4c508e1184363970ec41a9002b67c7d7ca81f95bff8ece3",
    "perov_5": "d486647ec30f377d39e4b99bd0e573987f767ce61f87487de482a14ece955e5d",
}
