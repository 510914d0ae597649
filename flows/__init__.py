"""Composition of the pipeline: the Prefect flow (``flows.pipeline``) and the ``dsv`` CLI
(``flows.cli``). No math lives here."""
