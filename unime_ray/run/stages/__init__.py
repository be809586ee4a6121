"""The stage declarations, a file per library package they drive: each reads earlier results
(``run.results``) and the config (through ``run.specs``), calls the library, and renders its report section.
They never import each other."""
