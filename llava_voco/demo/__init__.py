"""Runnable defaults that need nothing downloaded: the DigitGrid demo (``python -m llava_voco.demo``), its
data set and base models, and the VoCo mask demo (``python -m llava_voco.demo.mask``)."""
