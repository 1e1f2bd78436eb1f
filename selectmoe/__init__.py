"""selectmoe."""
