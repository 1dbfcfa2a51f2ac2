"""SHA-256 of every checkpoint file shipped in ``equicsp_core/checkpoints/``, checked on each load.

The one place to update when a checkpoint is (re-)shipped: ``sha256sum equicsp_core/checkpoints/<name>.pt``,
then the same hash in the model card ``<name>.md``. ``tests/test_checkpoint.py`` checks that every shipped
file matches its pin and that every pin has its file.
"""

SHIPPED_SHA256 = {
    "carbon_24": "d6fda9c939efdf0672a6d7b02225dfea857b463e8a57cc329cef72a42417b617",
    "mp_20": "c41a38c1f6969d79f8a3155aa2c2463d065bca0654586d9fa2154f1742dba811",
    "perov_5": "d486647ec30f377d39e4b99bd0e573987f767ce61f87487de482a14ece955e5d",
    "perov_5-gen": "53951455ca740c0b5640b19a33dfe6855e1673e3ab81fab79d3ca22504ed7fd5",
}
