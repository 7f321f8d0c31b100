"""The runtime layer: everything predicting and serving an exported model file needs, and nothing more. No module
here imports torch or any other training library (tests/test_layers.py checks), so `pip install catdog` stays
small and starts fast.

From the bottom up: `version`, `files` (atomic writes, the cache folder), `options` (dataclass fields as
command-line options), `images` (the one image loader), `transforms` (preprocessing that travels with a model),
`probabilities` (softmax, the mirror-view and orientation rules), `inference` (the one ONNX Runtime session and the
batch size measured per machine), `runs` (run directories as the runtime sees them), `data` (layouts and file
discovery), `extras`, `progress`; then the runtime commands' options (`config`) and the commands themselves,
`predict` and `explain`. The web service (`catdog.serve`) builds on these.
"""
