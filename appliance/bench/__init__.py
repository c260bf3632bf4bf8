"""`cube bench …`: measured reports. Each scenario module exposes a click command."""
