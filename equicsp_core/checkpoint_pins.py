"""SHA-256 of every checkpoint file shipped in ``equicsp_core/checkpoints/``, checked on each load.

The one place to update when a checkpoint is (re-)shipped: ``sha256sum equicsp_core/checkpoints/<name>.pt``,
then the same hash in the model card ``<name>.md``. ``tests/test_checkpoint.py`` checks that every shipped
file matches its pin and that every pin has its file.
"""

SHIPPED_SHA256 = {
    "mp_20": "a587714efc15da68e0d73d3fa909fa6eeb6089321f7f90adb71cad3d946271b7",
    "perov_5": "d486647ec30f377d39e4b99bd0e573987f767ce61f87487de482a14ece955e5d",
}
