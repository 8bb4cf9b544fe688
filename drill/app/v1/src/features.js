'use strict';
// drill-app v1: work orders and messages with a single mediaUrl.
exports.VERSION = 'v1';

exports.flags = () => ({});

exports.health = () => {};

exports.start = () => {};

exports.workOrder = async (ctx, id, cached) => {
  if (cached) return JSON.parse(cached);
  const r = await ctx.db.query(
    `SELECT id, organization_id, assigned_to, title, status, priority, created_at, updated_at
       FROM work_orders WHERE id = $1`, [id]);
  if (!r.rows.length) return null;
  const w = r.rows[0];
  return {
    id: Number(w.id), organizationId: Number(w.organization_id),
    assignedTo: w.assigned_to === null ? null : Number(w.assigned_to),
    title: w.title, status: w.status, priority: w.priority,
    createdAt: w.created_at, updatedAt: w.updated_at,
  };
};

exports.message = async (ctx, id) => {
  const r = await ctx.db.query(
    'SELECT id, work_order_id, author_id, body, media_url, created_at FROM messages WHERE id = $1', [id]);
  if (!r.rows.length) return null;
  const m = r.rows[0];
  return {
    id: Number(m.id), workOrderId: Number(m.work_order_id),
    authorId: m.author_id === null ? null : Number(m.author_id),
    body: m.body, mediaUrl: m.media_url, createdAt: m.created_at,
  };
};
