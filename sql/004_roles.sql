-- Version 4: access control (`smtpproxy db grant`).
--
-- The viewer role may read providers but not their encrypted secrets: column privileges
-- keep it away from providers.secret. This generated column tells it, and every listing,
-- whether a secret is stored without reading the secret itself.
ALTER TABLE providers
    ADD COLUMN has_secret boolean GENERATED ALWAYS AS (secret IS NOT NULL) STORED;
