"""SHA-256 of every checkpoint file shipped in ``equicsp_core/checkpoints/``, checked on each load.

The one place to update when a checkpoint is (re-)shipped: ``sha256sum equicsp_core/checkpoints/<name>.pt``,
then the same hash in the model card ``<name>.md``. ``tests/test_checkpoint.py`` checks that every shipped
file matches its pin and that every pin has its file.
"""

SHIPPED_SHA256 = {
    "mp_20": "1d72eadc5e104d8586054046bb1cd68e4eca17eb7405ee1fc18841eed90e1d20",
    "perov_5": "d486647ec30f377d39e4b99bd0e573987f767ce61f87487de482a14ece955e5d",
}
