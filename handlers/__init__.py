"""Fan-out handlers: webhooks, receiver, FCM, email, SMS and the live stream."""
