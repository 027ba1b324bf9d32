"""An HTTP webhook sink for natsconn, and the model of a third-party plugin package."""
