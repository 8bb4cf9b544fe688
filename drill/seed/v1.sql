-- Drill data written while v1 was live (before the v2 deploy at :v2_epoch).
-- psql variables: v2_epoch (unix seconds of the v2 deploy), v1_sha,
-- dpl_v1, dpl_v08, dpl_v09, dpl_err (Vercel deployment ids), sha_v08,
-- sha_v09, sha_err.  Counts are fixed (formulas, not random()); only
-- timestamps vary.
\set ON_ERROR_STOP on
SELECT setseed(0.4242);

INSERT INTO organizations (name, slug, plan, created_at)
SELECT v.name, v.slug, v.plan, to_timestamp(:v2_epoch) - (400 - v.i * 25) * interval '1 day'
FROM (VALUES
  (1, 'Acme Facilities', 'acme', 'enterprise'),
  (2, 'Northwind HVAC', 'northwind', 'standard'),
  (3, 'Blue Harbor Plumbing', 'blue-harbor', 'standard'),
  (4, 'Summit Elevators', 'summit', 'enterprise'),
  (5, 'Greenleaf Property Services', 'greenleaf', 'standard'),
  (6, 'Ironclad Security Systems', 'ironclad', 'standard'),
  (7, 'Riverbend Electric', 'riverbend', 'free'),
  (8, 'Polar Refrigeration', 'polar', 'standard'),
  (9, 'Metro Fire Protection', 'metro-fire', 'enterprise'),
  (10, 'Cedar Roofing', 'cedar', 'free'),
  (11, 'Atlas Building Maintenance', 'atlas', 'standard'),
  (12, 'Brightline Solar', 'brightline', 'standard')
) AS v(i, name, slug, plan)
ORDER BY v.i;

-- 30 people per organization: user id = (org - 1) * 30 + k, k = 1..30
INSERT INTO users (organization_id, email, full_name, role, created_at, last_seen_at)
SELECT o, format('%s.%s%s@%s.example.com', lower(fn), lower(ln), k, (SELECT slug FROM organizations WHERE id = o)),
       fn || ' ' || ln,
       CASE WHEN k = 1 THEN 'admin' WHEN k % 10 = 2 THEN 'dispatcher' ELSE 'technician' END,
       to_timestamp(:v2_epoch) - (300 - k * 5 + o) * interval '1 day',
       to_timestamp(:v2_epoch) - random() * interval '20 days'
FROM generate_series(1, 12) AS o,
     generate_series(1, 30) AS k,
     LATERAL (SELECT (ARRAY['Ana','Ben','Chloe','David','Elena','Farid','Grace','Hugo','Ines','Jamal',
                            'Kira','Liam','Maya','Noah','Olga','Pedro','Quinn','Rosa','Sven','Tara'])[1 + (o * 7 + k) % 20] AS fn,
                     (ARRAY['Smith','Okafor','Novak','Garcia','Chen','Muller','Rossi','Silva','Kowalski','Dubois',
                            'Haddad','Ivanova','Jensen','Kim','Lopez','Moreau','Nakamura','Olsen','Petrov','Quispe'])[1 + (o * 3 + k * 11) % 20] AS ln) AS names
ORDER BY o, k;

-- 2400 work orders, 200 per organization, created over the 180 days before v2
INSERT INTO work_orders (organization_id, assigned_to, title, status, priority, created_at, updated_at)
SELECT org, (org - 1) * 30 + 3 + (i % 27),
       (ARRAY['Replace compressor','Annual inspection','Leak under sink','Tripped breaker panel',
              'Elevator door sensor','Roof membrane repair','Fire alarm test','Thermostat not responding',
              'Install solar inverter','Water heater flush','Replace badge reader','Cooling tower cleaning'])[1 + i % 12]
         || ' - ' || (ARRAY['Building A','Building B','Main office','Warehouse','Store 12','Clinic',
                            'Parking level 2','Data room'])[1 + (i / 12) % 8],
       CASE WHEN i % 10 < 6 THEN 'done' WHEN i % 10 < 8 THEN 'in_progress'
            WHEN i % 10 = 8 THEN 'open' ELSE 'cancelled' END,
       1 + i % 5,
       created, created + random() * interval '3 days'
FROM (SELECT i, 1 + (i - 1) % 12 AS org,
             to_timestamp(:v2_epoch) - interval '180 days' + (i / 2400.0) * interval '179 days' AS created
      FROM generate_series(1, 2400) AS i) AS s
ORDER BY i;

-- 4800 messages, two per work order; 40% carry a photo (media_url)
INSERT INTO messages (work_order_id, author_id, body, media_url, created_at)
SELECT wo.id, wo.assigned_to,
       (ARRAY['On my way, ETA 20 minutes.','Arrived on site.','Part ordered, back on Thursday.',
              'Customer not available, rescheduled.','Fixed, tested, all good.','Photo of the damage attached.',
              'Need a second technician for this one.','Invoice sent to the customer.'])[1 + i % 8],
       CASE WHEN i % 5 IN (0, 2) THEN format('https://cdn.drill.example/media/%s.jpg', md5('msg' || i)) END,
       least(wo.created_at + (1 + i % 2) * interval '3 hours' + random() * interval '1 day',
             to_timestamp(:v2_epoch) - interval '1 minute')
FROM generate_series(1, 4800) AS i
JOIN work_orders wo ON wo.id = 1 + (i - 1) / 2
ORDER BY i;

INSERT INTO feature_flags (name, enabled, description, updated_at, updated_by) VALUES
  ('dark_mode', true, 'Dark theme in the technician app', to_timestamp(:v2_epoch) - interval '60 days', 'maya.kim'),
  ('legacy_csv_export', false, 'Old CSV export of work orders', to_timestamp(:v2_epoch) - interval '90 days', 'ben.novak'),
  ('photo_first', false, 'v2: technicians take the photo before the form', to_timestamp(:v2_epoch) - interval '7 days', 'deploy-bot'),
  ('message_attachments', false, 'v2: several files per message', to_timestamp(:v2_epoch) - interval '7 days', 'deploy-bot');

INSERT INTO deployment_history (version, git_sha, vercel_deployment_id, status, deployed_at, deployed_by, notes) VALUES
  ('1.2.0', :'sha_v08', :'dpl_v08', 'stable', to_timestamp(:v2_epoch) - interval '45 days', 'ci', 'scheduled release'),
  ('1.3.0', :'sha_v09', :'dpl_v09', 'stable', to_timestamp(:v2_epoch) - interval '30 days', 'ci', 'scheduled release'),
  ('1.4.0', :'v1_sha', :'dpl_v1', 'stable', to_timestamp(:v2_epoch) - interval '10 days', 'ci', 'tag v1'),
  ('2.0.0-rc1', :'sha_err', :'dpl_err', 'failed', to_timestamp(:v2_epoch) - interval '5 days', 'ci', 'build failed: type error in photo upload');
