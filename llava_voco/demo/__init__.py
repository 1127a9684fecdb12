"""Runnable defaults that need nothing downloaded: the VoCo mask demo and the DigitGrid data set."""
