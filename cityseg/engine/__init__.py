"""Engine: the trainer loop, the runner that wires config to components, the display."""
