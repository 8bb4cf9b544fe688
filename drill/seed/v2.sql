-- Drill data written after the v2 deploy (at :v2_epoch): the feature flags
-- turned on, photo-first work orders, photos added to older work orders,
-- messages with several attachments (backfilled = false), new users.
-- psql variables: v2_epoch, v2_sha, dpl_v2.
\set ON_ERROR_STOP on
SELECT setseed(0.2424);

UPDATE feature_flags SET enabled = true, updated_at = to_timestamp(:v2_epoch), updated_by = 'deploy-bot'
WHERE name IN ('photo_first', 'message_attachments');

INSERT INTO deployment_history (version, git_sha, vercel_deployment_id, status, deployed_at, deployed_by, notes)
VALUES ('2.0.0', :'v2_sha', :'dpl_v2', 'active', to_timestamp(:v2_epoch), 'ci', 'tag v2: photo-first, message attachments');

-- 24 new users (two per organization)
INSERT INTO users (organization_id, email, full_name, role, created_at, last_seen_at)
SELECT o, format('new.tech%s@%s.example.com', k, (SELECT slug FROM organizations WHERE id = o)),
       'New Technician ' || k, 'technician',
       to_timestamp(:v2_epoch) + (o * 2 + k) * interval '5 minutes',
       to_timestamp(:v2_epoch) + interval '2 hours'
FROM generate_series(1, 12) AS o, generate_series(1, 2) AS k
ORDER BY o, k;

-- 300 photo-first work orders (ids 2401..2700)
INSERT INTO work_orders (organization_id, assigned_to, title, status, priority, created_at, updated_at,
                         photo_url, photo_taken_at, photo_status, photo_first)
SELECT org, (org - 1) * 30 + 3 + (i % 27),
       (ARRAY['Photo survey: rooftop unit','Photo survey: meter room','Damage report','Before/after install'])[1 + i % 4]
         || ' #' || i,
       CASE WHEN i % 3 = 0 THEN 'done' ELSE 'in_progress' END, 1 + i % 5,
       created, created + interval '10 minutes',
       format('https://cdn.drill.example/photos/wo-%s.jpg', md5('photo' || i)),
       created - interval '2 minutes',
       (ARRAY['uploaded','processed','pending','failed'])[1 + i % 4],
       true
FROM (SELECT i, 1 + (i - 1) % 12 AS org,
             to_timestamp(:v2_epoch) + (i / 300.0) * interval '170 minutes' AS created
      FROM generate_series(1, 300) AS i) AS s
ORDER BY i;

-- 80 older work orders got a photo after the deploy (the trigger lets this
-- through: photo_first is on)
UPDATE work_orders
SET photo_url = format('https://cdn.drill.example/photos/wo-%s.jpg', md5('late' || id)),
    photo_taken_at = to_timestamp(:v2_epoch) + (id % 170) * interval '1 minute',
    photo_status = 'uploaded',
    updated_at = to_timestamp(:v2_epoch) + (id % 170) * interval '1 minute'
WHERE id BETWEEN 1 AND 2400 AND id % 30 = 0;

-- 600 messages (ids 4801..5400); every other one has 1-3 attachments
INSERT INTO messages (work_order_id, author_id, body, media_url, attachment_count, created_at)
SELECT wo, NULL,
       (ARRAY['Photos of the unit attached.','Before and after.','Serial plate and damage.','Done, see pictures.'])[1 + i % 4],
       CASE WHEN i % 2 = 0 THEN format('https://cdn.drill.example/media/v2-%s-1.jpg', md5('att' || i)) END,
       CASE WHEN i % 2 = 0 THEN 1 + (i / 2) % 3 ELSE 0 END,
       to_timestamp(:v2_epoch) + (i / 600.0) * interval '175 minutes'
FROM (SELECT i, 2400 + 1 + (i - 1) % 300 AS wo FROM generate_series(1, 600) AS i) AS s
ORDER BY i;

INSERT INTO message_attachments (message_id, media_url, content_type, size_bytes, backfilled, created_at)
SELECT m.id, format('https://cdn.drill.example/media/v2-%s-%s.jpg', md5('att' || (m.id - 4800)), n),
       'image/jpeg', 150000 + (m.id * 7919 + n * 104729) % 2500000, false, m.created_at
FROM messages m
JOIN LATERAL generate_series(1, m.attachment_count) AS n ON true
WHERE m.id > 4800
ORDER BY m.id, n;
