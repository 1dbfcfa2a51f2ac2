"""SHA-256 of every checkpoint file shipped in ``equicsp_core/checkpoints/``, checked on each load.

The one place to update when a checkpoint is (re-)shipped: ``sha256sum equicsp_core/checkpoints/<name>.pt``,
then the same hash in the model card ``<name>.md``. ``tests/test_checkpoint.py`` checks that every shipped
file matches its pin and that every pin has its file.
"""

SHIPPED_SHA256 = {
    "mp_20": "bb25e7f76a826d9db9d1be1ed6f3b5621be51bbd84bf9b6b3c70545ec0fe60c0",
    "perov_5": "d486647ec30f377d39e4b99bd0e573987f767ce61f87487de482a14ece955e5d",
}
