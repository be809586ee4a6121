"""The run: everything that knows the run config, the manifest or the run directory. The run config and its
presets (``config``), the stage interface (``stage``), every stage's result (``results``), the config -> library
spec builders (``specs``), the stage declarations (``stages/``), the runner (``runner``) and the report
(``report``). The library packages below never import this package."""
