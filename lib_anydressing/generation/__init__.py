"""One dressed generation, independent of the WebUI: options, garment preparation, feature cache."""
