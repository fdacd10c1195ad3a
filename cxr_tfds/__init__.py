"""TFDS datasets of this project. Importing the package registers `chest_xray_pneumonia`."""

from cxr_tfds.chest_xray_pneumonia import chest_xray_pneumonia_dataset_builder  # pylint: disable=unused-import
