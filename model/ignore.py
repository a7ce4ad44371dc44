"""The mask value of a pixel nobody labelled (CamVid's void, Label Studio's unpainted
pixels, pseudo-labels left out of the loss): one definition for both layers. Kept free of
imports so the service reads it without loading torch."""

IGNORE_INDEX = 255
