"""The CLI, one module per command group: options, messages and rendering; the logic lives below."""
