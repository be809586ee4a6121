"""The dual-encoder judge: frozen pretrained text and image towers (``towers``), linear heads fitted on the
training pairs with Platt calibration (``fit``), and the scorer the judge stage and the server load (``backend``).
A stand-in for a pretrained MLLM judge where none is available offline."""
