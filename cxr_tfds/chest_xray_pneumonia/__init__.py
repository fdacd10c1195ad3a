"""The chest_xray_pneumonia dataset (see README.md)."""
