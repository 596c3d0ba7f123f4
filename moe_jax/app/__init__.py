"""What the launch scripts call: the typed launch boundary and the end-to-end jobs.

Modules: `config` (ml_collections tree -> typed `Job`, `UsageError`), `presets` (the config trees of
configs/), `runtime` (mesh, model and learned predictor from a Job), `data` (the pydoc corpus,
SentencePiece, batches), `training` (AdamW training of a family), `predictor_training` (routing
traces -> the learned predictor), `workflows` (train, record, train the predictor, balance lines).
Nothing in the core imports this package.
"""
