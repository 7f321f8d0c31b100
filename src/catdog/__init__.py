"""catdog: train, evaluate, tune, export and serve image classifiers.

The package is a library; `catdog.cli` is a thin command-line layer on top of it. Each step of the pipeline lives
in the module named after it: `images` (the one image loader), `data` (layouts, splits, datasets, inspection),
`transforms` (preprocessing presets), `models` (model factories and offline pretrained weights), `features`
(the frozen-backbone feature cache), `train`, `evaluate`, `predict`, `export`, `tune`, `audit` and `serve`.
"""

__version__ = "0.3.0"
