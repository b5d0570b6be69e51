# SPDX-License-Identifier: GPL-3.0-or-later
"""Embedded demo world for DPM Latent: procedural shape images and tiny trained models.

``demo.world`` draws the images and reads their attributes back;
``demo/train.py`` trains the tiny VAE, flow models and CLIP stored in ``demo/models``.
"""
