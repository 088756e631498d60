DROP TABLE resend_audit;
