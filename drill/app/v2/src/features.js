'use strict';
// drill-app v2: photo-first work orders (FEATURE_PHOTO_FIRST) and message
// attachments (FEATURE_MESSAGE_ATTACHMENTS).
//
// The photo-first pipeline is broken in this release: while the flag is on,
// the thumbnail step fails every second (an ERROR line in the log), one
// work-order read in four fails with a 500, and /health reports the API as
// degraded.  Turning the flag off in .env and restarting stops all three.
exports.VERSION = 'v2';

const on = (v) => String(v || '').toLowerCase() === 'true';

exports.flags = (ctx) => ({
  photo_first: on(ctx.cfg.FEATURE_PHOTO_FIRST),
  message_attachments: on(ctx.cfg.FEATURE_MESSAGE_ATTACHMENTS),
});

exports.health = (h, ctx) => {
  if (!on(ctx.cfg.FEATURE_PHOTO_FIRST)) return;
  h.api = 'degraded';
  h.status = 'degraded';
  h.issues.push('photo-first: thumbnail pipeline failing (see the error log)');
};

let reads = 0;
let failures = 0;

exports.start = (ctx) => {
  if (!on(ctx.cfg.FEATURE_PHOTO_FIRST)) return;
  const bucket = ctx.cfg.PHOTO_UPLOAD_BUCKET || 'drill-photos';
  setInterval(() => {
    failures++;
    const wo = 1 + ((failures * 7919) % 2400);
    ctx.log('ERROR', `photo-first: thumbnail generation failed for work_order=${wo}: `
      + `upload to ${bucket} rejected (SignatureDoesNotMatch), attempt ${failures}`);
  }, 1000).unref();
};

exports.workOrder = async (ctx, id, cached) => {
  if (on(ctx.cfg.FEATURE_PHOTO_FIRST) && reads++ % 4 === 0) {
    throw new Error(`photo-first: cannot sign photo URL for work_order=${id} (SignatureDoesNotMatch)`);
  }
  if (cached) return JSON.parse(cached);
  const r = await ctx.db.query(
    `SELECT id, organization_id, assigned_to, title, status, priority, created_at, updated_at,
            photo_url, photo_taken_at, photo_status, photo_first
       FROM work_orders WHERE id = $1`, [id]);
  if (!r.rows.length) return null;
  const w = r.rows[0];
  return {
    id: Number(w.id), organizationId: Number(w.organization_id),
    assignedTo: w.assigned_to === null ? null : Number(w.assigned_to),
    title: w.title, status: w.status, priority: w.priority,
    createdAt: w.created_at, updatedAt: w.updated_at,
    photoUrl: w.photo_url, photoTakenAt: w.photo_taken_at,
    photoStatus: w.photo_status, photoFirst: w.photo_first,
  };
};

exports.message = async (ctx, id) => {
  const r = await ctx.db.query(
    `SELECT id, work_order_id, author_id, body, media_url, attachment_count, created_at
       FROM messages WHERE id = $1`, [id]);
  if (!r.rows.length) return null;
  const m = r.rows[0];
  const out = {
    id: Number(m.id), workOrderId: Number(m.work_order_id),
    authorId: m.author_id === null ? null : Number(m.author_id),
    body: m.body, mediaUrl: m.media_url, createdAt: m.created_at,
    attachmentCount: m.attachment_count, attachments: [],
  };
  if (on(ctx.cfg.FEATURE_MESSAGE_ATTACHMENTS)) {
    const a = await ctx.db.query(
      `SELECT id, media_url, content_type, size_bytes FROM message_attachments
        WHERE message_id = $1 ORDER BY id`, [id]);
    out.attachments = a.rows.map((x) => ({
      id: Number(x.id), url: x.media_url, contentType: x.content_type, sizeBytes: x.size_bytes,
    }));
    if (!out.mediaUrl && out.attachments.length) out.mediaUrl = out.attachments[0].url;
  }
  return out;
};
