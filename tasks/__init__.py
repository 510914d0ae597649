"""Pipeline stages: thin wrappers that read artifacts, call one ``dsv`` function, write and log.

One module per stage (``prepare``, ``pretrain``, ``extract``, ``coreset``, ``distill``, ``evaluate``),
plus the shared plumbing: ``config`` (params.yaml -> typed configs), ``paths`` (every artifact path),
``atomic`` (crash-safe writes), ``artifacts`` (tensor/Parquet IO), ``tracking`` (MLflow), ``stages``
(the stage registry used by the Prefect flow, the CLI and dvc.yaml).
"""
