"""smtpproxy: an SMTP relay appliance that delivers through email provider APIs."""

__version__ = "0.1.0"
