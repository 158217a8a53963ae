"""Channel tests: contacts, FCM, email, SMS and fan-out against real local stand-ins."""
